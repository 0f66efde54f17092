"""Pythonic calls: the output is a Python list of calls, ``[f(a=1), g(b="x")]`` (optionally
in ``<|python_start|>`` ... ``<|python_end|>``); keyword arguments must be literals. Each
call is sent whole when its closing parenthesis arrives (its arguments re-serialized as JSON).
"""

from __future__ import annotations

import ast
import json
from typing import Any

from engine.frontend.tool_parsers.base import Emitter, ToolParser


class PythonicParser(ToolParser):
    """``[f(a=1), g(b="x")]``: each call is parsed with ``ast`` and sent when it closes."""

    name = "pythonic"
    START, END = "<|python_start|>", "<|python_end|>"

    def __init__(self, out: Emitter) -> None:
        super().__init__(out)
        self.state = "start"
        self.raw = ""  # the list's text so far
        self.call = ""  # the call under way
        self.count = 0
        self.depth = 0
        self.quote = ""
        self.escape = False

    def _step(self) -> bool:
        if self.state == "start":
            text = self.buf.lstrip()
            bare = text[len(self.START):].lstrip() if text.startswith(self.START) else text
            if not self.final and (not bare or self.START.startswith(text)):
                return False
            if bare.startswith("["):
                self.state, self.raw = "list", self.buf[:len(self.buf) - len(bare) + 1]
                self.buf = bare[1:]
            else:
                self.state = "content"
            return True
        if self.state == "list":
            return self._scan()
        if self.state == "after":
            text = self.buf.lstrip()
            if not self.final and self.END.startswith(text):
                return False
            self.buf = text[len(self.END):] if text.startswith(self.END) else self.buf
            self.state = "content"
            return True
        self.out.content(self.buf)
        self.buf = ""
        return False

    def _scan(self) -> bool:
        for i, ch in enumerate(self.buf):
            self.raw += ch
            if self.quote:
                self.call += ch
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == self.quote:
                    self.quote = ""
                continue
            if self.depth == 0 and not self.call and (ch.isspace() or ch == ","):
                continue
            if self.depth == 0 and ch == "]" and not self.call:
                self.buf = self.buf[i + 1:]
                self.state = "after"
                return True
            if self.depth == 0 and not (ch.isalnum() or ch in "_(" or ch.isspace()):
                return self._fail(i)
            self.call += ch
            if ch in "'\"":
                self.quote = ch
            elif ch in "([{":
                self.depth += 1
            elif ch in ")]}":
                self.depth -= 1
                if self.depth == 0 and not self._emit():
                    return self._fail(i)
        self.buf = ""
        return False

    def _fail(self, i: int) -> bool:
        """Not a list of calls: what was not sent is content."""
        self.out.content(self.call if self.count else self.raw)
        self.buf = self.buf[i + 1:]
        self.state = "content"
        return True

    def _emit(self) -> bool:
        call, self.call = self.call, ""
        parsed = _python_call(call)
        if parsed is None:
            self.call = call
            return False
        self.count += 1
        self.out.start(parsed[0])
        self.out.args(json.dumps(parsed[1], ensure_ascii=False))
        return True

    def _end(self) -> None:
        if self.state == "list":
            self.out.content(self.call if self.count else self.raw)


def _python_call(text: str) -> tuple[str, dict[str, Any]] | None:
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    args: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            return None
        try:
            args[kw.arg] = _literal(kw.value)
        except (ValueError, TypeError, SyntaxError):
            return None
    return node.func.id, args


_JSON_NAMES = {"true": True, "false": False, "null": None}


def _literal(node: ast.expr) -> Any:
    """A literal's value, JSON's spellings of true/false/null accepted (as vLLM)."""
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict")
        return {str(_literal(k)): _literal(v)  # type: ignore[arg-type]
                for k, v in zip(node.keys, node.values, strict=True)}
    value = ast.literal_eval(node)
    if value is not None and not isinstance(value, str | int | float | bool):
        raise ValueError(f"{type(value).__name__} is not JSON")
    return value
