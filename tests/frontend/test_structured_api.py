"""Structured outputs at the frontend (HTTP and gRPC, fake pools): every accepted form
reaches the pool as one ``StructuredOutput``; an invalid spec, two forms at once or a form
that is not built is a 400 naming the parameter (gRPC INVALID_ARGUMENT) and queues nothing,
while a concurrent good request goes on unaffected."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from frontend.http_env import Env, assert_error

from engine.config import FrontendConfig
from engine.frontend.proto import pb2, pb2_grpc
from engine.messages import StructuredOutput

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
SCHEMA_TEXT = json.dumps(SCHEMA)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("structured"), FrontendConfig())
    yield e
    e.close()


def _chat(extra: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, **extra}


def _completion(extra: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": "Hello", "max_tokens": 2, **extra}


ACCEPTED = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": SCHEMA, "strict": True}}}, "json", SCHEMA_TEXT),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": SCHEMA, "strict": False, "description": "d"}}}, "json",
     SCHEMA_TEXT),
    ({"response_format": {"type": "json_object"}}, "json_object", ""),
    ({"structured_outputs": {"json": SCHEMA}}, "json", SCHEMA_TEXT),
    ({"structured_outputs": {"json": SCHEMA_TEXT}}, "json", SCHEMA_TEXT),
    ({"structured_outputs": {"regex": "[a-z]+"}}, "regex", "[a-z]+"),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice", '["yes", "no"]'),
    ({"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}, "grammar",
     'root ::= "a" | "b"'),
    ({"structured_outputs": {"json_object": True}}, "json_object", ""),
    ({"guided_json": SCHEMA}, "json", SCHEMA_TEXT),
    ({"guided_regex": "[0-9]{2}"}, "regex", "[0-9]{2}"),
    ({"guided_choice": ["a", "b"]}, "choice", '["a", "b"]'),
    ({"guided_grammar": 'root ::= "x"'}, "grammar", 'root ::= "x"'),
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(("extra", "kind", "value"), ACCEPTED)
def test_accepted_forms_reach_the_pool(env: Env, path: str, extra: dict[str, Any], kind: str,
                                       value: str) -> None:
    body = _chat(extra) if "chat" in path else _completion(extra)
    r = env.post(path, body)
    assert r.status_code == 200, r.text
    sent = env.pools[0].added[-1].sampling.structured
    assert sent == StructuredOutput(kind=kind, value=value, any_whitespace=False)


def test_text_format_and_no_form_are_unconstrained(env: Env) -> None:
    for extra in ({"response_format": {"type": "text"}}, {}):
        r = env.post("/v1/chat/completions", _chat(extra))
        assert r.status_code == 200, r.text
        assert env.pools[0].added[-1].sampling.structured is None


REFUSED = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format.json_schema.schema",
     "nonsense"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "required"),
    ({"response_format": {"type": "structural_tag"}}, "response_format.type", "structural_tag"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex", "parenthesis"),
    ({"structured_outputs": {"grammar": "root ::= foo"}}, "structured_outputs.grammar", "foo"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
     "exactly one"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "structural_tag"),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}},
     "guided_json", "nope"),
    ({"guided_regex": "[a-"}, "guided_regex", "invalid"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex",
     "one structured output"),
    ({"guided_choice": ["a"], "guided_regex": "a+"}, "guided_choice", "one structured output"),
]


@pytest.mark.parametrize(("extra", "param", "word"), REFUSED)
def test_bad_specs_are_400_naming_the_param(env: Env, extra: dict[str, Any], param: str,
                                             word: str) -> None:
    before = len(env.pools[0].added)
    err = assert_error(env.post("/v1/chat/completions", _chat(extra)), 400,
                       "invalid_request_error", word)
    assert err["param"] == param
    assert len(env.pools[0].added) == before  # nothing was queued


def test_bad_spec_leaves_a_concurrent_request_alone(env: Env) -> None:
    """A slow good request (a big schema) streams on while bad ones are refused."""
    big = {"type": "object", "properties": {f"f{i}": {"type": "string", "maxLength": 20}
                                            for i in range(200)}}
    good: dict[str, Any] = {}

    def run() -> None:
        good["r"] = env.post("/v1/completions", _completion({
            "max_tokens": 12, "user": "slow", "structured_outputs": {"json": big}}))

    t = threading.Thread(target=run)
    t.start()
    for extra, _, _ in REFUSED[:6]:
        assert env.post("/v1/completions", _completion(extra)).status_code == 400
    t.join(30)
    r = good["r"]
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_any_whitespace_flag(tmp_path: Path) -> None:
    e = Env(tmp_path, FrontendConfig(structured_outputs_any_whitespace=True))
    try:
        r = e.post("/v1/chat/completions", _chat({"response_format": {"type": "json_object"}}))
        assert r.status_code == 200, r.text
        assert e.pools[0].added[-1].sampling.structured.any_whitespace is True
        r = e.post("/v1/completions", _completion({"structured_outputs": {
            "json": SCHEMA, "disable_any_whitespace": True}}))
        assert r.status_code == 200, r.text
        assert e.pools[0].added[-1].sampling.structured.any_whitespace is False
    finally:
        e.close()


def test_grpc_structured_field(env: Env) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{env.fe.grpc_port}") as channel:
        stub = pb2_grpc.EngineStub(channel)

        def generate(**structured: Any) -> list[Any]:
            req = pb2.GenerateRequest(prompt="Hello", max_tokens=1,
                                      structured=pb2.StructuredOutput(**structured))
            return list(stub.Generate(req, timeout=10))

        assert generate(kind="json", value=SCHEMA_TEXT)[-1].finish_reason == "length"
        assert env.pools[0].added[-1].sampling.structured == StructuredOutput(
            kind="json", value=SCHEMA_TEXT)
        generate(kind="choice", choices=["x", "y"], any_whitespace=True)
        assert env.pools[0].added[-1].sampling.structured == StructuredOutput(
            kind="choice", value='["x", "y"]')
        before = len(env.pools[0].added)
        for bad, word in ((dict(kind="regex", value="(ab"), "parenthesis"),
                          (dict(kind="yaml"), "kind"),
                          (dict(kind="json", value="{"), "not valid JSON")):
            with pytest.raises(grpc.RpcError) as err:
                generate(**bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert word in err.value.details()
        assert len(env.pools[0].added) == before


def test_hostile_schemas_are_400(env: Env) -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(150):
        deep = {"type": "object", "properties": {"a": deep}}
    r = env.post("/v1/chat/completions", _chat({"structured_outputs": {"json": deep}}))
    assert r.status_code in (200, 400), r.text  # deep but valid: served or refused, no 5xx
    for extra, param in (({"guided_json": '{"type": "number", "minimum": NaN}'}, "guided_json"),
                         ({"guided_json": "[1, 2]"}, "guided_json"),
                         ({"structured_outputs": {"json": [1, 2]}}, "structured_outputs.json"),
                         ({"guided_json": [1, 2]}, "guided_json"),
                         ({"response_format": {"type": ["json_object"]}}, "response_format.type")):
        r = env.post("/v1/chat/completions", _chat(extra))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"].startswith(param), r.text
