"""The output tail: one request's ``RequestOutput``s turned into what a client reads.

The pool sends token ids; the client wants text. Between them, for every API (the frontend's
``serving.generate`` for HTTP and gRPC, and ``engine.LLM``), one ``OutputTail`` per request:

- incremental detokenization into text deltas, with stop strings cut (engine/detokenizer.py);
- the finish reason: a matched stop string is "stop" (and the pool, still generating, must
  be told to abort: ``Delta.abort``); otherwise the pool's reason, once the text held back
  (a partial character, a possible stop-string prefix) is released;
- top logprobs paired as (token id, logprob), best first;
- prompt logprobs, which arrive in chunks before the first token, gathered and handed out
  whole with the first delta;
- token counts for the usage of the last delta.

Pure: no I/O, no clock. After its last delta a tail ignores further outputs (a stop string
matched while the pool's outputs were still on their way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.detokenizer import IncrementalDetokenizer
from engine.messages import Explanation, PoolTiming, RequestOutput, SamplingParams
from engine.prompt_logprobs import PromptLogprob, PromptLogprobsBuffer


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Delta:
    """New output of one request since the previous delta."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    #: Per new token, the most likely tokens as (token id, logprob), best first.
    top_logprobs: list[list[tuple[int, float]]] | None = None
    #: "stop", "length", "abort" (or "error", for ``engine.LLM``) on the last delta, else None.
    finish_reason: str | None = None
    usage: Usage | None = None
    explanation: Explanation | None = None
    #: On the first delta of a request that asked for prompt logprobs: one entry per prompt
    #: token, None for the first (nothing precedes it).
    prompt_logprobs: list[PromptLogprob | None] | None = None
    #: A stop string ended the request while the pool still runs it: abort it there.
    abort: bool = False
    #: On the first delta with tokens of a pool's request: where its time went in the pool.
    timing: PoolTiming | None = None


class OutputTail:
    """One request's detokenizer, stop strings, logprob pairing and counts."""

    __slots__ = ("detok", "finished", "num_cached_tokens", "num_output_tokens",
                 "num_prompt_tokens", "prompt_logprobs")

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 sampling: SamplingParams) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, sampling.stop)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.finished = False
        #: Filled in place as the chunks arrive (``entries``), handed out with the first delta.
        self.prompt_logprobs = (PromptLogprobsBuffer(prompt_token_ids)
                                if sampling.prompt_logprobs is not None else None)

    @property
    def text(self) -> str:
        """Every text delta so far, joined."""
        return self.detok.text

    def feed(self, out: RequestOutput) -> Delta | None:
        """The delta ``out`` makes; None when there is nothing to tell (no token, no text
        and not the end) or the tail has finished already."""
        if self.finished:
            return None
        if out.prompt_logprobs is not None and self.prompt_logprobs is not None:
            self.prompt_logprobs.add(out.prompt_logprobs)
        self.num_output_tokens += len(out.new_token_ids)
        self.num_cached_tokens = out.num_cached_tokens or self.num_cached_tokens
        detok = self.detok
        text, stopped = detok.append(out.new_token_ids)
        finish = out.finish_reason
        abort = False
        if stopped:
            abort = finish is None  # the pool is still generating: stop it
            finish = "stop"
        elif finish is not None:
            text += detok.finish()
            finish = "stop" if detok.stopped else finish
        if finish is None and not (text or out.new_token_ids):
            return None  # nothing to tell yet (prompt logprobs wait for the first delta)
        prompt_lps = self.prompt_logprobs.take() if self.prompt_logprobs is not None else None
        top = top_pairs(out)
        if finish is None:
            return Delta(text, list(out.new_token_ids), out.logprobs, top,
                         prompt_logprobs=prompt_lps)
        self.finished = True
        usage = Usage(out.num_prompt_tokens or self.num_prompt_tokens, self.num_output_tokens,
                      self.num_cached_tokens)
        return Delta(text, list(out.new_token_ids), out.logprobs, top, finish, usage,
                     out.explanation, prompt_lps, abort)


def top_pairs(out: RequestOutput) -> list[list[tuple[int, float]]] | None:
    """Per new token of ``out``, its top tokens as (token id, logprob); None if not asked."""
    if out.top_token_ids is None or out.top_logprobs is None:
        return None
    return [list(zip(ids, lps, strict=True))
            for ids, lps in zip(out.top_token_ids, out.top_logprobs, strict=True)]
