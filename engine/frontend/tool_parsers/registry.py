"""The parsers ``--tool-call-parser`` names, by vLLM's names."""

from __future__ import annotations

from engine.frontend.tool_parsers.base import ToolParser
from engine.frontend.tool_parsers.hermes import HermesParser
from engine.frontend.tool_parsers.llama3_json import Llama3JsonParser
from engine.frontend.tool_parsers.mistral import MistralParser
from engine.frontend.tool_parsers.pythonic import PythonicParser

#: The parsers ``--tool-call-parser`` names (``engine.config.TOOL_CALL_PARSERS``).
PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser, PythonicParser)}
