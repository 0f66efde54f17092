"""The machinery every tool-call parser shares (``engine.frontend.tool_parsers``).

What a parser finds goes to an ``Emitter``: plain content, the start of a call (its name) and
fragments of the call's arguments. ``ToolParser`` is the base state machine (``buf`` holds
the text not consumed yet); ``ToolStream`` runs one choice's output through a parser, and
``parse`` is the non-streaming form, the same machine fed the whole text at once.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

# --------------------------------------------------------------------------- output


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class CallDelta:
    """New output of one call: ``id`` and ``name`` on its first delta only."""

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class Update:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


@dataclass
class Parsed:
    content: str | None
    calls: list[ToolCall]


class Emitter:
    """Collects what a parser finds, as per-feed ``Update``s and as the whole result.

    Whitespace-only content is held until non-whitespace content follows (and dropped at the
    end), so the newlines around call blocks do not become content. Calls beyond
    ``max_calls`` (``parallel_tool_calls: false``) are dropped.
    """

    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        self.content_parts: list[str] = []
        self._update = Update()
        self._held = ""
        self._started = 0
        self._muted = False

    def content(self, text: str) -> None:
        if not text:
            return
        text = self._held + text
        keep = len(text.rstrip())
        self._held = text[keep:]
        if keep:
            self.content_parts.append(text[:keep])
            self._update.content += text[:keep]

    def start(self, name: str) -> None:
        self._started += 1
        self._muted = self.max_calls is not None and self._started > self.max_calls
        if self._muted:
            return
        call = ToolCall(f"call_{secrets.token_hex(12)}", name)
        self.calls.append(call)
        self._update.calls.append(CallDelta(len(self.calls) - 1, call.id, name, ""))

    def args(self, text: str) -> None:
        if self._muted or not text or not self.calls:
            return
        self.calls[-1].arguments += text
        index = len(self.calls) - 1
        last = self._update.calls[-1] if self._update.calls else None
        if last is not None and last.index == index:
            last.arguments += text
        else:
            self._update.calls.append(CallDelta(index, None, None, text))

    def take(self) -> Update:
        update, self._update = self._update, Update()
        return update

    def result(self) -> Parsed:
        return Parsed("".join(self.content_parts) or None, self.calls)


def held_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that could be the start of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# --------------------------------------------------------------------------- parsers


class ToolParser:
    """Base of the parsers: ``buf`` holds the text not consumed yet; ``_step`` consumes a
    prefix of it and returns True while it can make progress without more text."""

    name = ""

    def __init__(self, out: Emitter) -> None:
        self.out = out
        self.buf = ""
        self.final = False

    def feed(self, text: str) -> None:
        self.buf += text
        while self.buf and self._step():
            pass

    def finish(self) -> None:
        self.final = True
        while self.buf and self._step():
            pass
        self._end()

    def _step(self) -> bool:
        raise NotImplementedError

    def _end(self) -> None:
        pass

    def _content_until(self, marker: str) -> bool:
        """Send content up to ``marker``; True (the marker consumed) if it is in ``buf``."""
        i = self.buf.find(marker)
        if i >= 0:
            self.out.content(self.buf[:i])
            self.buf = self.buf[i + len(marker):]
            return True
        keep = 0 if self.final else held_suffix(self.buf, marker)
        self.out.content(self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]
        return False


# --------------------------------------------------------------------------- streams


class ToolStream:
    """One choice's output through a parser: ``feed`` and ``finish`` return the ``Update``
    to send; ``result`` is everything found."""

    def __init__(self, make: Callable[[Emitter], ToolParser], max_calls: int | None = None,
                 ) -> None:
        self.out = Emitter(max_calls)
        self.parser = make(self.out)

    def feed(self, text: str) -> Update:
        self.parser.feed(text)
        return self.out.take()

    def finish(self) -> Update:
        self.parser.finish()
        return self.out.take()

    def step(self, text: str, final: bool) -> Update:
        """``feed``, then ``finish`` when ``final``, as one ``Update``."""
        self.parser.feed(text)
        if final:
            self.parser.finish()
        return self.out.take()

    def result(self) -> Parsed:
        return self.out.result()


def parse(stream: ToolStream, text: str) -> Parsed:
    """The whole output at once, through the same machine as streaming."""
    stream.feed(text)
    stream.finish()
    return stream.result()
