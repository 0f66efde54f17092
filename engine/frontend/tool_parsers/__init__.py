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

Modules: ``base`` (the output types, the ``Emitter``, the ``ToolParser`` base, ``ToolStream``
and ``parse``), ``json_calls`` (the JSON scanners and the base of the JSON-object formats),
one module per format, ``forced`` (the forced tool choices) and ``registry`` (``PARSERS``).

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

from engine.frontend.tool_parsers.base import (
    CallDelta,
    Emitter,
    Parsed,
    ToolCall,
    ToolParser,
    ToolStream,
    Update,
    parse,
)
from engine.frontend.tool_parsers.forced import NamedParser, RequiredParser
from engine.frontend.tool_parsers.hermes import HermesParser
from engine.frontend.tool_parsers.llama3_json import Llama3JsonParser
from engine.frontend.tool_parsers.mistral import MistralParser
from engine.frontend.tool_parsers.pythonic import PythonicParser
from engine.frontend.tool_parsers.registry import PARSERS

__all__ = [
    "PARSERS", "CallDelta", "Emitter", "HermesParser", "Llama3JsonParser", "MistralParser",
    "NamedParser", "Parsed", "PythonicParser", "RequiredParser", "ToolCall", "ToolParser",
    "ToolStream", "Update", "parse",
]
