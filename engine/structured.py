"""Structured outputs: what a ``StructuredOutput`` spec means as an xgrammar ``Grammar``.

One place turns a spec (JSON schema, any JSON object, regex, choice list, EBNF) into
xgrammar's tokenizer-independent ``Grammar``. The frontend calls ``check_spec`` to refuse a
bad spec with a 400 before anything is queued; the worker compiles the same ``Grammar``
against its tokenizer (``engine/worker/structured.py``). Nothing here knows a tokenizer, so
building a ``Grammar`` costs microseconds to milliseconds; compilation against the
vocabulary, the expensive part, happens in the worker.
"""

from __future__ import annotations

import json
from typing import Any

from engine.messages import StructuredOutput

KINDS = ("json", "json_object", "regex", "choice", "grammar")


class InvalidSpec(ValueError):
    """The spec cannot be turned into a grammar; the message says why."""


def build_grammar(spec: StructuredOutput) -> Any:
    """The xgrammar ``Grammar`` for ``spec`` (raises ``InvalidSpec``)."""
    import xgrammar as xgr

    try:
        match spec.kind:
            case "json":
                return xgr.Grammar.from_json_schema(
                    spec.value, any_whitespace=spec.any_whitespace, strict_mode=True)
            case "json_object":
                return xgr.Grammar.from_json_schema(
                    '{"type": "object"}', any_whitespace=spec.any_whitespace, strict_mode=False)
            case "regex":
                return xgr.Grammar.from_regex(spec.value)
            case "choice":
                return xgr.Grammar.from_ebnf(choice_ebnf(_choices(spec.value)))
            case "grammar":
                return xgr.Grammar.from_ebnf(spec.value)
            case _:
                raise InvalidSpec(f"unknown structured output kind {spec.kind!r}; "
                                  f"one of {', '.join(KINDS)}")
    except InvalidSpec:
        raise
    except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's parse errors
        raise InvalidSpec(_clean(str(e))) from None


def check_spec(spec: StructuredOutput) -> None:
    """Raise ``InvalidSpec`` unless ``spec`` makes a grammar."""
    build_grammar(spec)


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices``."""
    if not choices:
        raise InvalidSpec("choice needs at least one string")
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)


def _choices(value: str) -> list[str]:
    try:
        choices = json.loads(value)
    except json.JSONDecodeError as e:
        raise InvalidSpec(f"choice is not a JSON list: {e}") from None
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise InvalidSpec("choice must be a list of strings")
    if any(c == "" for c in choices):
        raise InvalidSpec("choice strings must not be empty")
    return choices


def _ebnf_literal(text: str) -> str:
    # A JSON string literal is a valid EBNF string literal in xgrammar's dialect (same
    # escapes: \" \\ \n \t \uXXXX).
    return json.dumps(text, ensure_ascii=True)


def _clean(message: str) -> str:
    """xgrammar's C++ errors start with ``[time] file:line: ``; keep the sentence."""
    first = message.strip().splitlines()[0] if message.strip() else message
    if first.startswith("[") and ": " in first:
        first = first.split(": ", 1)[1]
        if ".cc:" in first.split(" ", 1)[0]:
            first = first.split(": ", 1)[-1]
    return first
