"""Tool calling without a server: each output parser (whole text and streamed in pieces of
every size, which must agree), the translation of ``tool_choice`` into structured outputs
(schema shapes, checked with xgrammar and jsonschema), and the validation of ``tools``."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import jsonschema
import pytest

from engine.cli import config_from_args, config_from_dict
from engine.config import TOOL_CALL_PARSERS, ConfigError
from engine.frontend.serving import InvalidRequest
from engine.frontend.tool_parsers import (
    PARSERS,
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    NamedParser,
    PythonicParser,
    RequiredParser,
    ToolStream,
    parse,
)
from engine.frontend.tools import plan_tools, required_schema, template_messages
from engine.messages import StructuredOutput
from engine.structured import check_spec

WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "days": {"type": "integer"}},
           "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now"}}]


def streamed(make: Any, text: str, step: int, max_calls: int | None = None,
             ) -> tuple[str | None, list[tuple[str, str]], list[list[Any]]]:
    """Feed ``text`` in pieces of ``step`` characters; rebuild content and calls from the
    updates the way a client does (by index), and return the deltas per call too."""
    stream = ToolStream(make, max_calls)
    updates = [stream.feed(text[i:i + step]) for i in range(0, len(text), step)]
    updates.append(stream.finish())
    content = "".join(u.content for u in updates) or None
    calls: dict[int, list[Any]] = {}
    for u in updates:
        for d in u.calls:
            calls.setdefault(d.index, []).append(d)
    rebuilt = []
    for _, deltas in sorted(calls.items()):
        first = deltas[0]
        assert first.id is not None and first.id.startswith("call_") and first.name
        assert all(d.id is None and d.name is None for d in deltas[1:])  # name once, first
        rebuilt.append((first.name, "".join(d.arguments for d in deltas)))
    result = stream.result()
    assert result.content == content
    assert [(c.name, c.arguments) for c in result.calls] == rebuilt
    return content, rebuilt, list(calls.values())


def check_parser(make: Any, text: str, content: str | None,
                 calls: list[tuple[str, Any]], max_calls: int | None = None) -> None:
    whole = parse(ToolStream(make, max_calls), text)
    assert whole.content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == calls
    for step in (1, 2, 3, 5, 17, len(text) or 1):
        got_content, got_calls, _ = streamed(make, text, step, max_calls)
        assert got_content == content, step
        assert got_calls == [(c.name, c.arguments) for c in whole.calls], step


def test_parser_names_match_the_flag() -> None:
    assert tuple(PARSERS) == TOOL_CALL_PARSERS
    assert config_from_args(["--tool-call-parser", "pythonic"]).frontend.tool_call_parser == (
        "pythonic")
    assert config_from_args([]).frontend.tool_call_parser is None
    with pytest.raises(ConfigError, match="--tool-call-parser"):
        config_from_dict({"tool_call_parser": "xml"})


# --------------------------------------------------------------------------- hermes


def test_hermes_text_then_calls() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris {x}", "days": 3, "nested": [1, {"a": "}\\"]"}]}}\n</tool_call>\n'
            '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    check_parser(HermesParser, text, "Let me check.", [
        ("get_weather", {"city": "Paris {x}", "days": 3, "nested": [1, {"a": '}"]'}]}),
        ("now", {})])


def test_hermes_streams_arguments_in_fragments_as_written() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}</tool_call>'
    _, calls, deltas = streamed(HermesParser, text, 1)
    assert calls == [("get_weather", '{"city": "Paris", "days": 3}')]  # the model's own text
    assert len(deltas[0]) > 20  # one fragment per character fed: streamed, not buffered


def test_hermes_other_key_order_and_plain_text() -> None:
    check_parser(HermesParser, '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>',
                 None, [("f", {"a": 1})])
    check_parser(HermesParser, "No tools needed: 2 < 3 and <tool is not a tag.",
                 "No tools needed: 2 < 3 and <tool is not a tag.", [])


@pytest.mark.parametrize("text", [
    "<tool_call>not json</tool_call>",
    '<tool_call>{"name": "f"}</tool_call>',  # no arguments
    '<tool_call>{"name": "f", "argu',  # cut off before anything went out
])
def test_hermes_gives_back_what_is_not_a_call(text: str) -> None:
    check_parser(HermesParser, text, text, [])


def test_hermes_cut_off_arguments_stay_a_call() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"a": [1, 2'
    whole = parse(ToolStream(HermesParser), text)
    assert whole.content is None and [(c.name, c.arguments) for c in whole.calls] == [
        ("f", '{"a": [1, 2')]


def test_parallel_tool_calls_false_keeps_the_first() -> None:
    text = ('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
            '<tool_call>{"name": "g", "arguments": {"b": 2}}</tool_call>')
    check_parser(HermesParser, text, None, [("f", {"a": 1})], max_calls=1)


# --------------------------------------------------------------------------- others


def test_llama3_json() -> None:
    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
            '{"name": "now", "arguments": {}}')
    check_parser(Llama3JsonParser, text, None, [("get_weather", {"city": "Oslo"}),
                                                 ("now", {})])
    check_parser(Llama3JsonParser, '{"name": "now", "parameters": {}}', None, [("now", {})])
    check_parser(Llama3JsonParser, "It is {warm} today.", "It is {warm} today.", [])
    check_parser(Llama3JsonParser, '{"not": "a call"}', '{"not": "a call"}', [])


def test_mistral_array_bare_array_and_args_form() -> None:
    array = '[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "now", "arguments": {}}]'
    expected = [("get_weather", {"city": "Rome"}), ("now", {})]
    check_parser(MistralParser, "[TOOL_CALLS]" + array, None, expected)
    check_parser(MistralParser, array, None, expected)  # [TOOL_CALLS] skipped as special
    check_parser(MistralParser, 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}'
                 '[TOOL_CALLS]now[ARGS]{}', "Sure.", expected)
    check_parser(MistralParser, "[1, 2] are numbers", "[1, 2] are numbers", [])


def test_pythonic() -> None:
    text = '[get_weather(city="Paris", days=3, opts={"x": [1, true, None]}), now()]'
    check_parser(PythonicParser, text, None, [
        ("get_weather", {"city": "Paris", "days": 3, "opts": {"x": [1, True, None]}}),
        ("now", {})])
    check_parser(PythonicParser, "<|python_start|>[now()]<|python_end|>", None, [("now", {})])
    check_parser(PythonicParser, 'Plain answer (really).', 'Plain answer (really).', [])
    check_parser(PythonicParser, "[1, 2]", "[1, 2]", [])
    check_parser(PythonicParser, "[f(x)]", "[f(x)]", [])  # positional: not a tool call


def test_forced_outputs() -> None:
    check_parser(partial(NamedParser, function="get_weather"), '{"city": "Lima"}', None,
                 [("get_weather", {"city": "Lima"})])
    check_parser(RequiredParser, '[{"name":"get_weather","parameters":{"city":"Lima"}},'
                 '{"name":"now","parameters":{}}]', None,
                 [("get_weather", {"city": "Lima"}), ("now", {})])


# --------------------------------------------------------------------------- tool_choice


def test_named_choice_is_the_function_schema() -> None:
    plan = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, None,
                      None)
    assert plan is not None and plan.choice == "named" and plan.function == "get_weather"
    assert plan.structured == StructuredOutput(kind="json", value=json.dumps(WEATHER))
    plan = plan_tools(TOOLS, {"type": "function", "function": {"name": "now"}}, None, None)
    assert plan is not None and json.loads(plan.schema or "") == {"type": "object",
                                                                 "properties": {}}


@pytest.mark.parametrize("parallel", [None, True, False])
def test_required_choice_is_an_array_of_calls(parallel: bool | None) -> None:
    plan = plan_tools(TOOLS, "required", parallel, None)
    assert plan is not None and plan.structured is not None
    check_spec(plan.structured)  # xgrammar compiles it
    schema = json.loads(plan.structured.value)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert schema.get("maxItems") == (1 if parallel is False else None)
    ok = [{"name": "get_weather", "parameters": {"city": "Paris"}},
          {"name": "now", "parameters": {}}]
    jsonschema.validate(ok[:1], schema)
    if parallel is not False:
        jsonschema.validate(ok, schema)
    for bad in ([], [{"name": "get_weather", "parameters": {}}],  # city required
                [{"name": "other", "parameters": {}}], [{"name": "now"}], ok * 2 if
                parallel is False else [{"name": "now", "parameters": {}, "x": 1}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_required_schema_hoists_defs() -> None:
    point = {"type": "object", "properties": {"x": {"type": "number"}}}
    params = {"type": "object", "properties": {"p": {"$ref": "#/$defs/Point"}},
              "$defs": {"Point": point}}
    schema = required_schema({"f": params, "g": None}, parallel=True)
    assert schema["$defs"] == {"Point": point}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    jsonschema.validate([{"name": "f", "parameters": {"p": {"x": 1}}}], schema)
    check_spec(StructuredOutput(kind="json", value=json.dumps(schema)))
    with pytest.raises(InvalidRequest) as e:
        required_schema({"f": params, "g": {**params, "$defs": {"Point": {"type": "string"}}}},
                        parallel=True)
    assert e.value.param == "tools"


def test_auto_none_and_defaults() -> None:
    assert plan_tools(None, None, None, "hermes") is None
    plan = plan_tools(TOOLS, None, None, "hermes")
    assert plan is not None and (plan.choice, plan.parser, plan.structured) == (
        "auto", "hermes", None)
    plan = plan_tools(TOOLS, "none", False, None)
    assert plan is not None and plan.stream() is None and plan.tools == TOOLS


@pytest.mark.parametrize(("tools", "choice", "param", "words"), [
    (TOOLS, None, "tool_choice", "--tool-call-parser"),  # auto without a parser
    (TOOLS, "auto", "tool_choice", "--tool-call-parser"),
    (TOOLS, "sometimes", "tool_choice", "one of"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice", "'nope'"),
    (TOOLS, {"type": "function"}, "tool_choice", "function"),
    (None, "required", "tool_choice", "needs tools"),
    ([], "required", "tools", "non-empty"),
    ([{"type": "custom", "custom": {"name": "x"}}], "required", "tools", "function"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "required", "tools", "name"),
    ([TOOLS[1], TOOLS[1]], "required", "tools", "twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "required",
     "tools", "schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}}}}], "required",
     "tools", "tools[0].function.parameters"),
])
def test_invalid_tools(tools: Any, choice: Any, param: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        plan_tools(tools, choice, None, None)
    assert e.value.param == param and words in e.value.message, e.value.message


def test_history_shapes_for_templates() -> None:
    from engine.frontend.openai_protocol import ChatMessage

    messages = [ChatMessage.model_validate(m) for m in [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "now", "arguments": "{\"cut"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]]
    out = template_messages(messages)
    assert out[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": '{"cut'}}]}
    assert out[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    for bad, param in ((ChatMessage(role="tool", content="x"), "messages.0.tool_call_id"),
                       (ChatMessage.model_validate({"role": "user", "tool_calls": [
                           {"id": "a", "function": {"name": "f"}}]}), "messages.0.tool_calls")):
        with pytest.raises(InvalidRequest) as e:
            template_messages([bad])
        assert e.value.param == param
