"""The forced tool choices' outputs: ``named`` (the whole output is the arguments of the
named function) and ``required`` (a JSON array of ``{"name", "parameters"}``, the shape
``engine.frontend.tools.required_schema`` enforces).
"""

from __future__ import annotations

from engine.frontend.tool_parsers.base import Emitter, ToolParser
from engine.frontend.tool_parsers.json_calls import SequenceParser


class RequiredParser(SequenceParser):
    """The ``required`` choice's output: a JSON array of ``{"name", "parameters"}``."""

    name = "required"
    separators = "[,"
    closer = "]"

    def __init__(self, out: Emitter) -> None:
        super().__init__(out)
        self._begin_calls("")

    def _step(self) -> bool:
        if self.state == "calls":
            return self._step_calls("content")
        self.out.content(self.buf)
        self.buf = ""
        return False


class NamedParser(ToolParser):
    """The named choice's output: the whole text is the function's arguments."""

    name = "named"

    def __init__(self, out: Emitter, function: str) -> None:
        super().__init__(out)
        self.function = function
        self.started = False

    def feed(self, text: str) -> None:
        if not self.started:
            self.started = True
            self.out.start(self.function)
        self.out.args(text)

    def finish(self) -> None:
        self.feed("")
