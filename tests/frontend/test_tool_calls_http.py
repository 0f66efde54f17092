"""Tool calling through the HTTP app with the official ``openai`` client, against a fake pool
scripted to answer with a hermes tool call (tests/frontend/fake_pool.py): the tools and the
history's tool messages reach a Qwen-style chat template; the call comes back as
``message.tool_calls`` and, streamed, as OpenAI's tool-call deltas; forced choices send their
schema to the pool; bad tools are 400s naming the parameter."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from frontend.fake_pool import FakePool, make_model_dir
from frontend.http_env import HttpFrontend

from engine.config import FrontendConfig

#: A hermes/Qwen-style template that renders tools, tool calls (arguments as a dict) and
#: tool results.
TOOLS_TEMPLATE = (
    "{%- if tools %}<s>system: Tools:\n{% for t in tools %}{{ t.function | tojson }}\n"
    "{% endfor %}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<s>assistant: {{ m.content }}"
    "{%- for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}</tool_call>{%- endfor %}\n"
    "{%- elif m.role == 'tool' %}<s>tool {{ m.tool_call_id }}: {{ m.content }}\n"
    "{%- else %}<s>{{ m.role }}: {{ m.content }}\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<s>assistant: {%- endif %}")

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
HERMES = ('I will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": '
          '{"city": "Paris"}}\n</tool_call>')


class Env:
    def __init__(self, tmp: Path, cfg: FrontendConfig, template: str) -> None:
        self.model_dir = make_model_dir(tmp, template, max_model_len=2048)
        self.run_dir = tempfile.mkdtemp(prefix="tools-")
        self.pools = [FakePool(self.run_dir, 0), FakePool(self.run_dir, 1)]
        self.fe = HttpFrontend(self.run_dir, self.model_dir, cfg)
        self.client = openai.OpenAI(base_url=f"{self.fe.url}/v1", api_key="x", max_retries=0,
                                    timeout=20)

    def script(self, tenant: str, text: str) -> None:
        self.pools[0].scripts[tenant] = list(self.fe.tokenizer.encode(text))

    def sent(self) -> Any:
        return self.pools[0].added[-1]

    def prompt(self) -> str:
        return str(self.fe.tokenizer.decode(list(self.sent().prompt_token_ids)))

    def close(self) -> None:
        self.fe.close()
        for p in self.pools:
            p.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("tools"), FrontendConfig(tool_call_parser="hermes"),
            TOOLS_TEMPLATE)
    yield e
    e.close()


def test_auto_hermes_call_with_text_before(env: Env) -> None:
    env.script("hermes", HERMES)
    reply = env.client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS,
                                               user="hermes", max_tokens=500)
    assert '{"name": "get_weather", "description": "Weather now"' in env.prompt()
    assert env.sent().sampling.structured is None  # auto: parsed, not constrained
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will look it up."
    [call] = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_auto_hermes_streamed_deltas(env: Env) -> None:
    env.script("hermes", HERMES)
    chunks = list(env.client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, user="hermes", max_tokens=500,
        stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert content == "I will look it up."
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id and first.id.startswith("call_")
    assert first.type == "function" and first.function and first.function.name == "get_weather"
    assert len(rest) > 5  # the arguments arrive in fragments, one per token here
    assert all(d.index == 0 and d.id is None and d.function and d.function.name is None
               for d in rest)
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_plain_answer_and_tool_choice_none(env: Env) -> None:
    env.script("plain", "It is sunny.")
    reply = env.client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS,
                                               user="plain", max_tokens=100)
    assert reply.choices[0].message.content == "It is sunny."
    assert not reply.choices[0].message.tool_calls and reply.choices[0].finish_reason == "stop"
    env.script("hermes", HERMES)
    reply = env.client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS,
                                               tool_choice="none", user="hermes",
                                               max_tokens=500)
    assert "get_weather" in env.prompt()  # the model still sees the tools
    assert reply.choices[0].message.content == HERMES  # but nothing is parsed
    assert reply.choices[0].finish_reason == "stop"


def test_parallel_tool_calls_false(env: Env) -> None:
    env.script("two", HERMES + '<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    for parallel, names in ((True, ["get_weather", "now"]), (False, ["get_weather"])):
        reply = env.client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, user="two", max_tokens=500,
            parallel_tool_calls=parallel)
        assert [c.function.name for c in reply.choices[0].message.tool_calls or []] == names


@pytest.mark.parametrize("stream", [False, True])
def test_forced_choices_send_their_schema(env: Env, stream: bool) -> None:
    env.script("named", '{"city": "Oslo"}')
    env.script("required", '[{"name": "now", "parameters": {}}]')
    for tenant, choice in (("named", {"type": "function", "function": {"name": "get_weather"}}),
                           ("required", "required")):
        reply: Any = env.client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=choice, user=tenant,
            max_tokens=500, stream=stream)
        spec = env.sent().sampling.structured
        assert spec is not None and spec.kind == "json"
        schema = json.loads(spec.value)
        if stream:
            deltas = [d for c in reply for d in c.choices[0].delta.tool_calls or []]
            name = deltas[0].function.name
            arguments = "".join(d.function.arguments or "" for d in deltas)
        else:
            [call] = reply.choices[0].message.tool_calls
            assert reply.choices[0].message.content is None
            assert reply.choices[0].finish_reason == "tool_calls"
            name, arguments = call.function.name, call.function.arguments
        if tenant == "named":
            assert schema == WEATHER
            assert (name, json.loads(arguments)) == ("get_weather", {"city": "Oslo"})
        else:
            assert schema["type"] == "array" and schema["minItems"] == 1
            assert (name, json.loads(arguments)) == ("now", {})


def test_history_with_tool_calls_and_results(env: Env) -> None:
    messages = [*MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "18 C, sunny"}]
    env.script("plain", "It is sunny.")
    reply = env.client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                               user="plain", max_tokens=100)
    assert reply.choices[0].message.content == "It is sunny."
    prompt = env.prompt()
    assert ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
            in prompt)  # the arguments reached the template as a dict
    assert "tool call_9: 18 C, sunny" in prompt


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/Nope"}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [], "tool_choice": "required"}, "tools"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": 3}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "a"}]}]},
     "messages.0.tool_calls.0.function"),
])
def test_bad_tools_are_400_with_param(env: Env, body: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{env.fe.url}/v1/chat/completions", json={"messages": MESSAGES, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    ok = env.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert ok.choices[0].finish_reason == "length"  # the server is unaffected


def test_auto_without_parser_and_template_without_tools(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The fake model's default template ignores tools: they are passed anyway (logged), and
    forced choices still work; auto without --tool-call-parser is a 400 naming the flag."""
    e = Env(tmp_path, FrontendConfig(), "{% for m in messages %}<s>{{ m.role }}: "
            "{{ m.content }}\n{% endfor %}<s>assistant: ")
    try:
        with pytest.raises(openai.BadRequestError) as err:
            e.client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS)
        assert err.value.param == "tool_choice" and "--tool-call-parser" in str(err.value)
        e.script("named", '{"city": "Oslo"}')
        with caplog.at_level("WARNING", logger="engine.frontend.tools"):
            reply = e.client.chat.completions.create(
                model="tiny", messages=MESSAGES, tools=TOOLS, user="named", max_tokens=50,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert any("does not render tools" in r.getMessage() for r in caplog.records)
        assert reply.choices[0].message.tool_calls
        assert e.prompt() == "<s>user: Weather in Paris?\n<s>assistant: "
    finally:
        e.close()
