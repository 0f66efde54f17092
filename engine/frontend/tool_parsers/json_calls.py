"""The JSON side of the parsers: where a JSON value ends, one call object
``{"name": ..., "arguments"|"parameters": {...}}`` (its arguments streamed as the model writes
them), a sequence of such objects, and ``SequenceParser``, the base of the parsers whose calls
are JSON objects (hermes, llama3_json, mistral, required).
"""

from __future__ import annotations

import json
import re

from engine.frontend.tool_parsers.base import Emitter, ToolParser

# --------------------------------------------------------------------------- scanners


class JsonEnd:
    """Where a JSON object or array ends, one character at a time."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.done = False

    def push(self, ch: str) -> None:
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            self.done = self.depth <= 0


_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_ARG_KEYS = ("arguments", "parameters")


class CallObject:
    """One ``{"name": ..., "arguments"|"parameters": {...}}`` object, fed from its ``{``.

    Streams the arguments when the name comes first and the arguments are an object;
    otherwise parses the whole object when it closes. ``ok`` is False when the object is
    not a call (the caller gives its text back as content).
    """

    def __init__(self, out: Emitter) -> None:
        self.out = out
        self.text = ""
        self.outer = JsonEnd()
        self.name: str | None = None  # known once the head matched
        self.args: JsonEnd | None = None  # set once the arguments object opened
        self.whole = False  # the arguments are not an object: parse the object at its end
        self.ok = True

    @property
    def done(self) -> bool:
        return self.outer.done

    @property
    def streamed(self) -> bool:
        return self.args is not None

    def feed(self, text: str) -> int:
        """Consume up to the object's end; return how many characters were used."""
        used = 0
        fragment: list[str] = []
        for ch in text:
            if self.outer.done:
                break
            used += 1
            self.text += ch
            self.outer.push(ch)
            if self.args is not None:
                if not self.args.done:
                    self.args.push(ch)
                    fragment.append(ch)
            elif self.name is None:
                if ch in ' \t\n\r:"':
                    self._match_head()
            elif not self.whole and not ch.isspace():
                if ch == "{":  # the arguments object opens: stream it from here
                    self.out.start(self.name)
                    self.args = JsonEnd()
                    self.args.push(ch)
                    fragment.append(ch)
                else:
                    self.whole = True
        self.out.args("".join(fragment))
        if self.outer.done and self.args is None:
            self._parse_whole()
        return used

    def _match_head(self) -> None:
        m = _HEAD.match(self.text)
        if m is not None:
            try:
                self.name = str(json.loads(m.group(1)))
            except json.JSONDecodeError:
                self.whole = True

    def _parse_whole(self) -> None:
        try:
            obj = json.loads(self.text)
        except json.JSONDecodeError:
            obj = None
        keys = [k for k in _ARG_KEYS if isinstance(obj, dict) and k in obj]
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not keys:
            self.ok = False
            return
        args = obj[keys[0]]
        self.out.start(obj["name"])
        self.out.args(args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


class CallSequence:
    """Call objects separated by whitespace and ``separators``, ending at ``closer`` (which
    is consumed) or at any other character (which is not)."""

    def __init__(self, out: Emitter, separators: str = "", closer: str | None = None) -> None:
        self.out = out
        self.separators = separators
        self.closer = closer
        self.current: CallObject | None = None
        self.raw = ""  # the text of the object under way
        self.count = 0  # objects sent as calls
        self.ended = False
        self.failed = False

    def feed(self, text: str) -> int:
        used = 0
        while used < len(text) and not self.ended:
            if self.current is not None:
                n = self.current.feed(text[used:])
                self.raw += text[used:used + n]
                used += n
                if not self.current.done:
                    break
                if not self.current.ok:
                    self.failed = self.ended = True
                    break
                self.current, self.raw = None, ""
                self.count += 1
                continue
            ch = text[used]
            if ch == "{":
                self.current = CallObject(self.out)
            elif ch == self.closer:
                used += 1
                self.ended = True
            elif ch.isspace() or ch in self.separators:
                used += 1
            else:
                self.ended = True
        return used

    @property
    def sent_any(self) -> bool:
        return self.count > 0 or (self.current is not None and self.current.streamed)

    def unsent(self) -> str:
        """At the end of the text: the object under way, if none of it went out."""
        if self.current is not None and not self.current.streamed:
            return self.raw
        return ""


def opens_array(text: str) -> bool | None:
    """Does ``text`` (stripped) open a JSON array of objects? None: cannot tell yet."""
    if not text.startswith("["):
        return False
    rest = text[1:].lstrip()
    return rest.startswith("{") if rest else None


# --------------------------------------------------------------------------- parsers


class SequenceParser(ToolParser):
    """States ``content`` (plain text), ``calls`` (a ``CallSequence`` under way, ``raw``
    its text including any marker) and what a subclass adds."""

    separators = ""
    closer: str | None = None

    def __init__(self, out: Emitter) -> None:
        super().__init__(out)
        self.state = "content"
        self.raw = ""
        self.calls = CallSequence(out)

    def _begin_calls(self, raw: str) -> None:
        self.state, self.raw = "calls", raw
        self.calls = CallSequence(self.out, self.separators, self.closer)

    def _step_calls(self, after: str) -> bool:
        n = self.calls.feed(self.buf)
        self.raw += self.buf[:n]
        self.buf = self.buf[n:]
        if not self.calls.ended:
            return False
        if self.calls.failed or not self.calls.count:  # not calls after all: content
            self.out.content(self.calls.raw if self.calls.count else self.raw)
        self.state = "content" if self.calls.failed or not self.calls.count else after
        return True

    def _end(self) -> None:
        if self.state == "calls":
            self.out.content(self.calls.unsent() if self.calls.sent_any else self.raw)
