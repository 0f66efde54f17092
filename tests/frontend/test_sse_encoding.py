"""The streamed chunks' fast encoder (msgspec, engine.frontend.openai_format.sse_event_fast)
writes the same JSON values as ``json.dumps`` (sse_event) for every text a token can decode
to: escapes may be spelled differently, the values read back must not differ."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine.frontend.openai_format import sse_event, sse_event_fast

TEXTS = ["", "hello", ' "quoted" \\ back', "tab\there\nnew\rret", "\x00\x01\x1b\x7f",
         "émoji 🙂 中文", "\u2028\u2029", "\ufffd", "</script>", "a" * 3000]


def _read(event: str | bytes) -> Any:
    raw = event.decode() if isinstance(event, bytes) else event
    assert raw.startswith("data: ") and raw.endswith("\n\n")
    return json.loads(raw[len("data: "):-2])


@pytest.mark.parametrize("text", TEXTS)
def test_fast_chunk_reads_back_the_same(text: str) -> None:
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1700000000,
             "model": "m", "choices": [{"index": 3, "text": text, "logprobs": None,
                                        "finish_reason": None}]}
    chat = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None,
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                      "prompt_tokens_details": {"cached_tokens": 0}}}
    for obj in (chunk, chat):
        fast = sse_event_fast(obj)
        assert isinstance(fast, bytes)
        assert _read(fast) == _read(sse_event(obj)) == obj
        assert "\n" not in fast.decode()[len("data: "):-2]  # one SSE data line
