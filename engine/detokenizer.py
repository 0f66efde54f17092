"""Incremental detokenization and stop strings, shared by every frontend. Pure: no I/O.

Detokenizing one token at a time is wrong in general: byte-level BPE tokens can carry part
of a UTF-8 character, and SentencePiece-style decoders drop the leading space of the first
token they see. Like vLLM and TGI, ``IncrementalDetokenizer`` decodes a short window of
tokens twice, ``ids[prefix_offset:read_offset]`` (already emitted) and
``ids[prefix_offset:]``, and emits the difference, but only once the window no longer ends
in U+FFFD (an incomplete character); then the window slides forward.

``StopStringMatcher`` sits after it: it holds back any tail of the text that could be the
start of a stop string, and on a match truncates the text right before the stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
#: Prompt tokens decoded as context for the first generated token (as in vLLM).
PROMPT_CONTEXT_TOKENS = 5


def decode_fn(tokenizer: Any, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:
    """``ids -> text`` for a ``tokenizers.Tokenizer`` or a ``transformers`` tokenizer.

    A fast transformers tokenizer is unwrapped to its Rust backend: the same text, without
    transformers' optional space clean-up (which is not stable under concatenation).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) or tokenizer
    if hasattr(backend, "decode_batch"):  # tokenizers.Tokenizer
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(  # slow transformers tokenizer
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


class StopStringMatcher:
    """Streams text through, stopping at the first occurrence of any stop string.

    ``feed(text) -> (releasable_text, stopped)``; ``flush()`` releases what was held back
    once the stream ends without a match. Empty stop strings are ignored.
    """

    def __init__(self, stop: Iterable[str] = ()) -> None:
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop if s))
        self.matched: str | None = None
        self._held = ""
        self._max_hold = max((len(s) for s in self.stop), default=1) - 1

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, text: str) -> tuple[str, bool]:
        if self.matched is not None:
            return "", True
        if not self.stop:
            return text, False
        buf = self._held + text
        first: tuple[int, str] | None = None
        for s in self.stop:
            i = buf.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            self.matched, self._held = first[1], ""
            return buf[: first[0]], True
        keep = self._partial_match_len(buf)
        self._held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_match_len(self, buf: str) -> int:
        """Length of the longest tail of ``buf`` that some stop string starts with."""
        for k in range(min(len(buf), self._max_hold), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


class IncrementalDetokenizer:
    """Turns a request's generated token ids into text deltas, applying stop strings.

    ``append(ids) -> (text_delta, stopped)`` for each batch of new tokens; ``finish()`` when
    the request ends, for the text still held back (a partial character or a possible
    stop-string prefix). ``text`` is everything emitted so far. Once a stop string matched,
    further tokens are ignored and ``stop_reason`` names the matched string.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._decode = decode_fn(tokenizer, skip_special_tokens)
        self._ids: list[int] = list(prompt_token_ids)
        self._num_prompt = len(self._ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(0, self._read_offset - PROMPT_CONTEXT_TOKENS)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:])
        self._stop = StopStringMatcher(stop)
        self._parts: list[str] = []
        self._finished = False

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_prompt:]

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    @property
    def stop_reason(self) -> str | None:
        return self._stop.matched

    def append(self, new_token_ids: Iterable[int]) -> tuple[str, bool]:
        if self._stop.stopped or self._finished:
            return "", self._stop.stopped
        self._ids.extend(new_token_ids)
        return self._emit(self._advance(final=False), final=False)

    def finish(self) -> str:
        """Release whatever is held back; call once, when the request has ended."""
        if self._stop.stopped or self._finished:
            return ""
        self._finished = True
        delta, _ = self._emit(self._advance(final=True), final=True)
        return delta

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(self._prefix_text):
            return ""
        if new_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""  # an incomplete character: wait for its remaining bytes
        delta = new_text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        return delta

    def _emit(self, delta: str, final: bool) -> tuple[str, bool]:
        out, stopped = self._stop.feed(delta)
        if final and not stopped:
            out += self._stop.flush()
        self._parts.append(out)
        return out, stopped
