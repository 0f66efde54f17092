"""Mistral: ``[TOOL_CALLS]`` followed by a JSON array of ``{"name", "arguments"}`` or by
``name[ARGS]{...}`` (newer tokenizers); text before the marker is content. Because the
frontend decodes with special tokens skipped, a Mistral tokenizer's ``[TOOL_CALLS]`` never
reaches the text: an output that starts with a JSON array of objects is taken as the calls.
"""

from __future__ import annotations

from engine.frontend.tool_parsers.base import Emitter
from engine.frontend.tool_parsers.json_calls import JsonEnd, SequenceParser, opens_array


class MistralParser(SequenceParser):
    """``[TOOL_CALLS]`` then a JSON array, or ``name[ARGS]{...}`` per call; a bare JSON
    array of objects at the start (the marker skipped as a special token) is calls too."""

    name = "mistral"
    MARK, ARGS = "[TOOL_CALLS]", "[ARGS]"
    separators = "[,"
    closer = "]"

    def __init__(self, out: Emitter) -> None:
        super().__init__(out)
        self.state = "start"
        self.args = JsonEnd()

    def _step(self) -> bool:
        if self.state == "start":
            opens = opens_array(self.buf.lstrip())
            if opens is None and not self.final:
                return False
            if opens:
                self._begin_calls("")
            else:
                self.state = "content"
            return True
        if self.state == "content":
            if not self._content_until(self.MARK):
                return False
            self.state, self.raw = "marked", self.MARK
            return True
        if self.state == "marked":  # after [TOOL_CALLS]: an array, or name[ARGS]{...}
            text = self.buf.lstrip()
            if not text:
                return False
            self.buf = text
            if text[0] in "[{":
                self._begin_calls(self.raw)
            else:
                self.state = "name"
            return True
        if self.state == "name":
            i = self.buf.find(self.ARGS)
            if i < 0:
                return False
            self.out.start(self.buf[:i].strip())
            self.buf = self.buf[i + len(self.ARGS):]
            self.state, self.args = "args", JsonEnd()
            return True
        if self.state == "args":
            return self._step_args()
        return self._step_calls("content")

    def _step_args(self) -> bool:
        text = self.buf
        if self.args.depth == 0:  # not opened yet
            text = text.lstrip()
        used = 0
        for ch in text:
            if self.args.done:
                break
            self.args.push(ch)
            used += 1
        self.out.args(text[:used])
        self.buf = text[used:]
        if self.args.done:
            self.state = "content"
            return True
        return False

    def _end(self) -> None:
        if self.state in ("marked", "name"):
            self.out.content(self.raw + self.buf)
        else:
            super()._end()
