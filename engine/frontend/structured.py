"""Structured outputs in requests: the accepted forms, turned into one ``StructuredOutput``.

HTTP (both endpoints):

- OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type":
  "json_object"}``, ``{"type": "json_schema", "json_schema": {"name", "schema", "strict",
  "description"}}`` (the schema is enforced whether ``strict`` is true or not);
- vLLM's ``structured_outputs``: exactly one of ``json`` (a schema, object or JSON text),
  ``regex``, ``choice`` (a list of strings), ``grammar`` (EBNF), ``json_object: true``; plus
  ``disable_any_whitespace``;
- vLLM's older ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``.

At most one form per request (two are a 400 naming the second). What is not built
(``structural_tag``, ``whitespace_pattern``, other keys) is refused, never ignored.

Every spec is checked with ``engine.structured.check_spec`` in a thread (``validate``): a big
schema's grammar is built off the event loop, and a bad one is a 400 naming the parameter
before anything is queued. The worker compiles the grammar (``engine/worker/structured.py``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from engine.frontend.serving import InvalidRequest, check
from engine.messages import StructuredOutput
from engine.structured import InvalidSpec, check_spec

#: vLLM's ``structured_outputs`` keys that choose the constraint, and our kinds for them.
_VLLM_KINDS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar",
               "json_object": "json_object"}
_VLLM_OPTIONS = {"disable_any_whitespace"}
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


async def structured_output(body: Any, *, any_whitespace: bool) -> StructuredOutput | None:
    """The request's structured output, validated (raises ``InvalidRequest``); None when it
    asks for none. ``any_whitespace`` is the server's default for JSON."""
    found = parse_structured(body, any_whitespace=any_whitespace)
    if found is None:
        return None
    spec, param = found
    await validate(spec, param)
    return spec


def parse_structured(body: Any, *, any_whitespace: bool) -> tuple[StructuredOutput, str] | None:
    """The spec a request body asks for and the parameter that gave it (not yet checked)."""
    forms: list[tuple[StructuredOutput, str]] = []
    rf = getattr(body, "response_format", None)
    if rf is not None:
        spec = _response_format(rf, any_whitespace)
        if spec is not None:
            forms.append((spec, "response_format.json_schema.schema" if spec.kind == "json"
                          else "response_format"))
    so = getattr(body, "structured_outputs", None)
    if so is not None:
        forms.append(_vllm_structured(so, any_whitespace))
    for name, kind in _GUIDED.items():
        value = getattr(body, name, None)
        if value is not None:
            forms.append((_spec(kind, value, name, any_whitespace), name))
    if len(forms) > 1:
        raise InvalidRequest(f"give one structured output, not {forms[0][1]} and {forms[1][1]}",
                             forms[1][1])
    return forms[0] if forms else None


async def validate(spec: StructuredOutput, param: str) -> None:
    """``check_spec`` in a worker thread; an invalid spec is ``InvalidRequest(param)``."""
    try:
        await asyncio.get_running_loop().run_in_executor(None, check_spec, spec)
    except InvalidSpec as e:
        raise InvalidRequest(f"{param} is invalid: {e}", param) from None


def _response_format(rf: Any, any_whitespace: bool) -> StructuredOutput | None:
    check(isinstance(rf, dict), "response_format must be an object", "response_format")
    kind = rf.get("type")
    match kind:
        case "text":
            _only(rf, {"type"}, "response_format")
            return None
        case "json_object":
            _only(rf, {"type"}, "response_format")
            return StructuredOutput(kind="json_object", any_whitespace=any_whitespace)
        case "json_schema":
            _only(rf, {"type", "json_schema"}, "response_format")
            js = rf.get("json_schema")
            check(isinstance(js, dict), "response_format.json_schema must be an object with "
                  "a schema", "response_format.json_schema")
            _only(js, {"name", "schema", "strict", "description"}, "response_format.json_schema")
            check("schema" in js, "response_format.json_schema.schema is required",
                  "response_format.json_schema.schema")
            return _spec("json", js["schema"], "response_format.json_schema.schema",
                         any_whitespace)
        case "structural_tag":
            raise InvalidRequest("response_format type structural_tag is not supported "
                                 "(json_schema, json_object, text)", "response_format.type")
        case _:
            raise InvalidRequest(f"response_format type must be text, json_object or "
                                 f"json_schema, got {kind!r}", "response_format.type")


def _vllm_structured(so: Any, any_whitespace: bool) -> tuple[StructuredOutput, str]:
    check(isinstance(so, dict), "structured_outputs must be an object", "structured_outputs")
    unknown = set(so) - set(_VLLM_KINDS) - _VLLM_OPTIONS
    check(not unknown, f"structured_outputs: {', '.join(sorted(unknown))} not supported "
          f"(one of {', '.join(_VLLM_KINDS)}; disable_any_whitespace)", "structured_outputs")
    given = [k for k in _VLLM_KINDS if so.get(k) not in (None, False)]
    check(len(given) == 1, f"structured_outputs needs exactly one of {', '.join(_VLLM_KINDS)}"
          f", got {len(given)}", "structured_outputs")
    key = given[0]
    param = f"structured_outputs.{key}"
    disable = so.get("disable_any_whitespace")
    check(disable is None or isinstance(disable, bool), "must be a boolean",
          "structured_outputs.disable_any_whitespace")
    if disable:
        any_whitespace = False
    if key == "json_object":
        check(so[key] is True, "json_object must be true", param)
        return StructuredOutput(kind="json_object", any_whitespace=any_whitespace), param
    return _spec(_VLLM_KINDS[key], so[key], param, any_whitespace), param


def _spec(kind: str, value: Any, param: str, any_whitespace: bool) -> StructuredOutput:
    match kind:
        case "json":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise InvalidRequest(f"{param} is not valid JSON: {e}", param) from None
            check(isinstance(value, dict | bool), f"{param} must be a JSON schema (an object)",
                  param)
            try:
                text = json.dumps(value, allow_nan=False)
            except (ValueError, RecursionError) as e:
                raise InvalidRequest(f"{param} is not a valid JSON schema: {e}", param) from None
            return StructuredOutput(kind="json", value=text, any_whitespace=any_whitespace)
        case "choice":
            check(isinstance(value, list) and bool(value)
                  and all(isinstance(c, str) and c for c in value),
                  f"{param} must be a non-empty list of non-empty strings", param)
            return StructuredOutput(kind="choice", value=json.dumps(value))
        case _:  # regex, grammar
            check(isinstance(value, str) and bool(value), f"{param} must be a non-empty "
                  "string", param)
            return StructuredOutput(kind=kind, value=value)


def _only(obj: dict[str, Any], allowed: set[str], param: str) -> None:
    extra = sorted(set(obj) - allowed)
    check(not extra, f"{param}: {', '.join(extra)} not supported", f"{param}.{extra[0]}"
          if extra else param)


def structured_from_proto(msg: Any, *, any_whitespace: bool) -> StructuredOutput:
    """The gRPC ``StructuredOutput`` message as the engine's spec (not yet checked)."""
    kind = msg.kind
    check(kind in ("json", "json_object", "regex", "choice", "grammar"),
          f"structured.kind must be json, json_object, regex, choice or grammar, got {kind!r}",
          "structured.kind")
    if msg.HasField("any_whitespace"):
        any_whitespace = msg.any_whitespace
    if kind == "json_object":
        return StructuredOutput(kind=kind, any_whitespace=any_whitespace)
    if kind == "choice":
        return _spec(kind, list(msg.choices), "structured.choices", any_whitespace)
    return _spec(kind, msg.value, "structured.value", any_whitespace)
