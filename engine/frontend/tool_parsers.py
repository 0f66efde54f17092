"""Tool calls in a model's output text: one small incremental parser per output format.

A parser is a state machine fed the output text in pieces (``feed``) and told when it ends
(``finish``). It reports what it finds to an ``Emitter``: plain content, the start of a call
(its name) and fragments of the call's arguments (JSON text). The non-streaming parse is the
same machine fed the whole text at once, so a streamed response and a non-streamed one
carry the same content and the same calls by construction.

Arguments are streamed as the model writes them: once a call's name and the opening ``{``
of its arguments are seen, every further character of the arguments object goes out until
the object closes (a small JSON scanner tracks strings, escapes and nesting). The arguments
text is the model's own, so it is whitespace-exact, not re-serialized. A call whose keys come
in another order (arguments before name) is held until its object closes, then parsed whole.
Text that looked like a call but is not one (bad JSON, a missing name) is given back as
content, as vLLM does.

Formats (vLLM's parser names):

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, repeated;
  text before or between the blocks is content (Hermes, Qwen 2.5/3).
- ``llama3_json``: the output starts with ``<|python_tag|>`` or ``{``; then JSON objects
  ``{"name": ..., "parameters"|"arguments": {...}}`` separated by ``;``.
- ``mistral``: ``[TOOL_CALLS]`` followed by a JSON array of ``{"name", "arguments"}`` or by
  ``name[ARGS]{...}`` (newer tokenizers); text before the marker is content. Because the
  frontend decodes with special tokens skipped, a Mistral tokenizer's ``[TOOL_CALLS]``
  never reaches the text: an output that starts with a JSON array of objects is taken as
  the calls.
- ``pythonic``: the output is a Python list of calls, ``[f(a=1), g(b="x")]`` (optionally in
  ``<|python_start|>`` ... ``<|python_end|>``); keyword arguments must be literals. Each call
  is sent whole when its closing parenthesis arrives (its arguments re-serialized as JSON).

The forced tool choices use two more machines: ``named`` (the whole output is the arguments
of the named function) and ``required`` (the output is a JSON array of ``{"name",
"parameters"}``, the shape ``engine.frontend.tools.required_schema`` enforces).
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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


# --------------------------------------------------------------------------- scanners


def _held_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that could be the start of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class _JsonEnd:
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


class _CallObject:
    """One ``{"name": ..., "arguments"|"parameters": {...}}`` object, fed from its ``{``.

    Streams the arguments when the name comes first and the arguments are an object;
    otherwise parses the whole object when it closes. ``ok`` is False when the object is
    not a call (the caller gives its text back as content).
    """

    def __init__(self, out: Emitter) -> None:
        self.out = out
        self.text = ""
        self.outer = _JsonEnd()
        self.name: str | None = None  # known once the head matched
        self.args: _JsonEnd | None = None  # set once the arguments object opened
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
                    self.args = _JsonEnd()
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


class _CallSequence:
    """Call objects separated by whitespace and ``separators``, ending at ``closer`` (which
    is consumed) or at any other character (which is not)."""

    def __init__(self, out: Emitter, separators: str = "", closer: str | None = None) -> None:
        self.out = out
        self.separators = separators
        self.closer = closer
        self.current: _CallObject | None = None
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
                self.current = _CallObject(self.out)
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


def _opens_array(text: str) -> bool | None:
    """Does ``text`` (stripped) open a JSON array of objects? None: cannot tell yet."""
    if not text.startswith("["):
        return False
    rest = text[1:].lstrip()
    return rest.startswith("{") if rest else None


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
        keep = 0 if self.final else _held_suffix(self.buf, marker)
        self.out.content(self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]
        return False


class _SequenceParser(ToolParser):
    """States ``content`` (plain text), ``calls`` (a ``_CallSequence`` under way, ``raw``
    its text including any marker) and what a subclass adds."""

    separators = ""
    closer: str | None = None

    def __init__(self, out: Emitter) -> None:
        super().__init__(out)
        self.state = "content"
        self.raw = ""
        self.calls = _CallSequence(out)

    def _begin_calls(self, raw: str) -> None:
        self.state, self.raw = "calls", raw
        self.calls = _CallSequence(self.out, self.separators, self.closer)

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


class HermesParser(_SequenceParser):
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
        keep = 0 if self.final else _held_suffix(self.buf, self.END)
        self.buf = self.buf[len(self.buf) - keep:]
        return False


class Llama3JsonParser(_SequenceParser):
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


class MistralParser(_SequenceParser):
    """``[TOOL_CALLS]`` then a JSON array, or ``name[ARGS]{...}`` per call; a bare JSON
    array of objects at the start (the marker skipped as a special token) is calls too."""

    name = "mistral"
    MARK, ARGS = "[TOOL_CALLS]", "[ARGS]"
    separators = "[,"
    closer = "]"

    def __init__(self, out: Emitter) -> None:
        super().__init__(out)
        self.state = "start"
        self.args = _JsonEnd()

    def _step(self) -> bool:
        if self.state == "start":
            opens = _opens_array(self.buf.lstrip())
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
            self.state, self.args = "args", _JsonEnd()
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


class RequiredParser(_SequenceParser):
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


#: The parsers ``--tool-call-parser`` names (``engine.config.TOOL_CALL_PARSERS``).
PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser, PythonicParser)}


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
