"""Llama 3.x JSON calls: the output starts with ``<|python_tag|>`` or ``{``; then JSON
objects ``{"name": ..., "parameters"|"arguments": {...}}`` separated by ``;``.
"""

from __future__ import annotations

from engine.frontend.tool_parsers.base import Emitter
from engine.frontend.tool_parsers.json_calls import SequenceParser


class Llama3JsonParser(SequenceParser):
    """Calls only from the first character (after ``<|python_tag|>``); otherwise content."""

    name = "llama3_json"
    MARK = "<|python_tag|>"
    separators = ";"

    def __init__(self, out: Emitter) -> None:
        super().__init__(out)
        self.state = "start"

    def _step(self) -> bool:
        if self.state == "start":
            text = self.buf.lstrip()
            if not self.final and (not text or self.MARK.startswith(text)):
                return False
            if text.startswith(self.MARK):
                self.buf = text[len(self.MARK):]
                self._begin_calls(self.MARK)
            elif text.startswith("{"):
                self._begin_calls("")
            else:
                self.state = "content"
            return True
        if self.state == "calls":
            return self._step_calls("content")
        self.out.content(self.buf)
        self.buf = ""
        return False
