"""Tool calling on ``/v1/chat/completions``: ``tools``, ``tool_choice``,
``parallel_tool_calls``, and the history's tool messages.

``plan_tools`` validates the request's tools and turns the choice into a ``ToolPlan``:

- ``none``: the tools reach the chat template, the output is plain content.
- ``auto`` (the default when tools are given): the output is parsed for calls by the parser
  the server was started with (``--tool-call-parser``, ``engine.frontend.tool_parsers``).
  Without one, auto is refused with a 400 naming the flag, as vLLM does: answering with
  prose where the client offered tools would silently ignore them.
- ``required`` and a named function are enforced with structured outputs: named, the output
  is constrained to that function's parameter schema (the output text is the arguments);
  required, to a JSON array of ``{"name": <one of the tools>, "parameters": <its schema>}``
  (at most one item when ``parallel_tool_calls`` is false). These work whatever the parser
  and whatever the chat template.

Every tool's ``parameters`` must be a JSON schema xgrammar accepts (``check_spec``), so a
forced choice can never fail later. The tools go to the model's chat template as given
(``apply_chat_template(tools=...)``); a template that does not read ``tools`` renders the
prompt without them, as in vLLM (logged once per model): the forced choices still hold.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec

from engine.frontend.serving import InvalidRequest, check
from engine.frontend.tool_parsers import (
    PARSERS,
    NamedParser,
    RequiredParser,
    ToolStream,
)
from engine.messages import EngineRequest, StructuredOutput
from engine.structured import InvalidSpec, check_spec

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EMPTY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}}
CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for its prompt, its sampling and its response."""

    tools: list[dict[str, Any]]  # for the chat template
    choice: str  # "none", "auto", "required" or "named"
    function: str | None = None  # the named choice's function
    parallel: bool = True
    parser: str | None = None  # auto's parser
    schema: str | None = None  # the forced choices' JSON schema, as text

    @property
    def structured(self) -> StructuredOutput | None:
        return StructuredOutput(kind="json", value=self.schema) if self.schema else None

    def stream(self) -> ToolStream | None:
        """A fresh parse of one choice's output; None when the output is plain content."""
        make: Any
        if self.choice == "named":
            make = partial(NamedParser, function=str(self.function))
        elif self.choice == "required":
            make = RequiredParser
        elif self.choice == "auto" and self.parser is not None:
            make = PARSERS[self.parser]
        else:
            return None
        return ToolStream(make, None if self.parallel else 1)


def plan_tools(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None,
               parser: str | None) -> ToolPlan | None:
    """Validate (``InvalidRequest`` naming ``tools`` or ``tool_choice``) and plan; None
    when the request has no tools."""
    if tools is None:
        check(tool_choice in (None, "none"), "tool_choice needs tools", "tool_choice")
        return None
    check(isinstance(tools, list) and len(tools) > 0,
          "tools must be a non-empty list (omit it for no tools)", "tools")
    functions = _functions(tools)
    tools = [dict(t) for t in tools]
    parallel = parallel_tool_calls is not False
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, str):
        check(choice in CHOICES, f"tool_choice must be one of {', '.join(CHOICES)} or "
              f'{{"type": "function", "function": {{"name": ...}}}}, got {choice!r}',
              "tool_choice")
        if choice == "auto":
            check(parser is not None, 'tool_choice "auto" (the default with tools) needs the '
                  "server started with --tool-call-parser (hermes, llama3_json, mistral or "
                  'pythonic); use tool_choice "required", a named function or "none"',
                  "tool_choice")
            return ToolPlan(tools, "auto", parallel=parallel, parser=parser)
        if choice == "none":
            return ToolPlan(tools, "none", parallel=parallel)
        return ToolPlan(tools, "required", parallel=parallel,
                        schema=json.dumps(required_schema(functions, parallel)))
    name = _named(choice)
    check(name in functions, f"tool_choice names function {name!r}, which is not in tools "
          f"({', '.join(functions)})", "tool_choice")
    return ToolPlan(tools, "named", function=name, parallel=parallel,
                    schema=json.dumps(functions[name] or _EMPTY_OBJECT))


def _functions(tools: Sequence[Any]) -> dict[str, dict[str, Any] | None]:
    """Each function's parameter schema by name (None: no parameters given)."""
    functions: dict[str, dict[str, Any] | None] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        check(isinstance(tool, dict) and tool.get("type") == "function",
              f'{where}: only tools of type "function" are supported', "tools")
        fn = tool.get("function")
        check(isinstance(fn, dict), f"{where}.function must be an object", "tools")
        name = fn.get("name")
        check(isinstance(name, str) and bool(_NAME.match(name)),
              f"{where}.function.name must be 1 to 64 letters, digits, _ or -, got {name!r}",
              "tools")
        check(name not in functions, f"{where}: function {name!r} is given twice", "tools")
        check(fn.get("description") is None or isinstance(fn.get("description"), str),
              f"{where}.function.description must be a string", "tools")
        check(fn.get("strict") is None or isinstance(fn.get("strict"), bool),
              f"{where}.function.strict must be a boolean", "tools")
        params = fn.get("parameters")
        check(params is None or isinstance(params, dict),
              f"{where}.function.parameters must be a JSON schema object", "tools")
        if params:
            try:
                check_spec(StructuredOutput(kind="json", value=json.dumps(params)))
            except InvalidSpec as e:
                raise InvalidRequest(f"{where}.function.parameters is not a usable JSON "
                                     f"schema: {e}", "tools") from None
        functions[name] = params or None
    return functions


def _named(choice: Any) -> str:
    usage = 'tool_choice must be {"type": "function", "function": {"name": ...}}'
    check(isinstance(choice, dict) and choice.get("type") == "function", usage, "tool_choice")
    fn = choice.get("function")
    check(isinstance(fn, dict) and isinstance(fn.get("name"), str), usage, "tool_choice")
    return str(fn["name"])


def required_schema(functions: dict[str, dict[str, Any] | None],
                    parallel: bool) -> dict[str, Any]:
    """A JSON array (one item unless ``parallel``) of calls to any of ``functions``.

    Each function's ``$defs`` move to the top (``#/$defs/...`` references resolve from the
    root); two functions defining one name differently are refused.
    """
    defs: dict[str, Any] = {}
    items = []
    for name, params in functions.items():
        params = dict(params or _EMPTY_OBJECT)
        for key, definition in (params.pop("$defs", None) or {}).items():
            check(defs.get(key, definition) == definition,
                  f"tools define $defs/{key} differently; give one definition", "tools")
            defs[key] = definition
        items.append({"type": "object",
                      "properties": {"name": {"type": "string", "enum": [name]},
                                     "parameters": params},
                      "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def constrain(request: EngineRequest, spec: StructuredOutput) -> EngineRequest:
    """``request`` with its output constrained to a forced tool choice's schema."""
    check(request.sampling.structured is None, "a forced tool_choice and a structured output "
          "(response_format or structured_outputs) both constrain the output; give one",
          "tool_choice")
    return msgspec.structs.replace(
        request, sampling=msgspec.structs.replace(request.sampling, structured=spec))


# --------------------------------------------------------------------------- history


def template_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """The request's messages as Hugging Face chat templates expect them: text content as a
    string (``""`` for none), an assistant's ``tool_calls`` with their ``arguments`` as a
    dict (as vLLM passes them;
    arguments that are not a JSON object stay a string), a tool message's ``tool_call_id``."""
    out = []
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m.role, "content": _text(m.content)}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            check(m.role == "assistant", f"messages[{i}]: only assistant messages carry "
                  "tool_calls", f"messages.{i}.tool_calls")
            msg["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": _arguments(c.function.arguments)}}
                for c in m.tool_calls]
        if m.role == "tool":
            check(bool(m.tool_call_id), f"messages[{i}]: a tool message needs tool_call_id",
                  f"messages.{i}.tool_call_id")
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def _arguments(arguments: str) -> Any:
    """A JSON object's text as a dict; anything else as given (a truncated call replayed
    from an earlier answer must not make every later turn fail; templates render strings)."""
    try:
        args = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        return arguments
    return dict(args) if isinstance(args, dict) else arguments


_warned: set[int] = set()


def warn_if_template_ignores_tools(tokenizer: Any, model: str) -> None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "tools" not in template and id(tokenizer) not in _warned:
        _warned.add(id(tokenizer))
        log.warning("model %s: its chat template does not render tools; the prompt goes "
                    "without them (forced tool choices still hold)", model)
