"""Chat prompts: messages rendered with the model's own chat template, then tokenized.

Shared by the HTTP API and the in-process ``LLM.chat`` so both build the same tokens for the
same messages. As in vLLM, the template's text is tokenized without adding special tokens
again (the template writes them itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class NoChatTemplate(ValueError):
    pass


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """``tools`` (OpenAI's tool objects) go to the template as ``tools``; a template that
    does not read them renders without them."""
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("this model has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         tools=list(tools) if tools else None)
    return list(tokenizer.encode(text, add_special_tokens=False))
