"""Prompt logprobs as a client sees them, assembled from the chunks the pool sends.

The scheduler sends a request's prompt logprobs in chunks (one per prefill step, or one at
the end of the prompt with the vllm runner), each prompt position once, all before or with
the request's first token (or the finish of a ``max_tokens`` 0 request). Both the served
frontend and the in-process ``LLM`` put them in place with ``PromptLogprobsBuffer`` and hand
the whole list out once: one entry per prompt token, None for the first (nothing precedes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.messages import PromptLogprobs


@dataclass
class PromptLogprob:
    """One prompt token's logprob given the tokens before it, its rank (1: the most likely)
    and the request's ``prompt_logprobs`` most likely tokens, best first."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


class PromptLogprobsBuffer:
    """A request's prompt logprobs as they arrive, placed by prompt position (a position sent
    again replaces itself); ``take`` hands them out once."""

    def __init__(self, prompt_token_ids: Sequence[int]) -> None:
        self.prompt = prompt_token_ids
        self.entries: list[PromptLogprob | None] = [None] * len(prompt_token_ids)
        self.taken = False

    def add(self, chunk: PromptLogprobs) -> None:
        for j, (lp, rank) in enumerate(zip(chunk.token_logprobs, chunk.ranks, strict=True)):
            i = chunk.first + j
            if 0 < i < len(self.prompt):
                top = (list(zip(chunk.top_token_ids[j], chunk.top_logprobs[j], strict=True))
                       if chunk.top_token_ids else [])
                self.entries[i] = PromptLogprob(self.prompt[i], lp, rank, top)

    def take(self) -> list[PromptLogprob | None] | None:
        """The entries, the first time only (None afterwards)."""
        if self.taken:
            return None
        self.taken = True
        return self.entries
