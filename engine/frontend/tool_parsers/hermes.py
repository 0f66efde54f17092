"""Hermes and Qwen 2.5/3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
repeated; text before or between the blocks is content.
"""

from __future__ import annotations

from engine.frontend.tool_parsers.base import held_suffix
from engine.frontend.tool_parsers.json_calls import SequenceParser


class HermesParser(SequenceParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def _step(self) -> bool:
        if self.state == "content":
            if not self._content_until(self.START):
                return False
            self._begin_calls(self.START)
            return True
        if self.state == "calls":
            return self._step_calls("close")
        # "close": skip to the end tag
        i = self.buf.find(self.END)
        if i >= 0:
            self.buf = self.buf[i + len(self.END):]
            self.state = "content"
            return True
        keep = 0 if self.final else held_suffix(self.buf, self.END)
        self.buf = self.buf[len(self.buf) - keep:]
        return False
