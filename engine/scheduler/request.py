"""A request as the scheduler tracks it: the only mutable request state in the engine."""

from __future__ import annotations

import enum

from engine.messages import CachedRequestData, EngineRequest, SamplingParams
from engine.scheduler.block_manager import ROOT_HASH, chain_hash


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued on a worker, holds no blocks
    RUNNING = "running"  # admitted: holds blocks on its worker, scheduled every step
    FINISHED = "finished"


class Request:
    """Scheduler-side state of one request.

    ``num_tokens`` counts every known token (prompt plus outputs); ``num_computed_tokens``
    of them have KV in ``block_ids`` on ``worker_id``. A running request in decode has
    exactly one uncomputed token: the one it sampled last.
    """

    __slots__ = (
        "admitted_seq",
        "arrival_time",
        "block_hashes",
        "block_ids",
        "cache_parent",
        "cache_salt",
        "decode_delta",
        "eos_token_ids",
        "finish_reason",
        "first_scheduled_time",
        "max_num_tokens",
        "next_prompt_logprob",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_preemptions",
        "num_prompt_tokens",
        "num_registered_blocks",
        "num_tokens",
        "output_token_ids",
        "placement_scores",
        "predicted_cached_tokens",
        "priority",
        "prompt_token_ids",
        "request_id",
        "sampling",
        "status",
        "stop_ids",
        "tenant",
        "worker_id",
    )

    def __init__(self, req: EngineRequest, max_model_len: int) -> None:
        self.request_id: str = req.request_id
        self.prompt_token_ids: tuple[int, ...] = req.prompt_token_ids
        self.sampling: SamplingParams = req.sampling
        self.priority: int = req.priority
        self.arrival_time: float = req.arrival_time
        self.eos_token_ids: frozenset[int] = (
            frozenset() if req.sampling.ignore_eos else frozenset(req.eos_token_ids)
        )
        # Hot-path copies: token ids that stop the request, and counts kept up to date.
        self.stop_ids: frozenset[int] = self.eos_token_ids | frozenset(req.sampling.stop_token_ids)
        self.num_prompt_tokens: int = len(req.prompt_token_ids)
        # A continuation (resubmitted after its pool died) starts with the outputs it had,
        # exactly as a preempted request resumes: they count for every limit and penalty.
        self.output_token_ids: list[int] = list(req.output_token_ids)
        self.num_tokens: int = self.num_prompt_tokens + len(self.output_token_ids)
        self.max_num_tokens: int = min(self.num_prompt_tokens + req.sampling.max_tokens,
                                       max_model_len)
        self.tenant: str = req.tenant
        # Prompt logprobs: the first prompt token whose logprob the frontend has not been sent
        # (1: none sent; ``num_prompt_tokens``: all sent, none asked for, or a continuation:
        # every position went out before its first token).
        self.next_prompt_logprob: int = (
            1 if req.sampling.prompt_logprobs is not None and not self.output_token_ids
            else self.num_prompt_tokens)
        self.block_ids: list[int] = []
        self.num_computed_tokens: int = 0
        self.num_cached_tokens: int = 0
        self.num_preemptions: int = 0
        self.worker_id: int | None = None
        self.status: RequestStatus = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.first_scheduled_time: float | None = None
        self.cache_salt: str = req.cache_salt
        # Prefix cache: chain hashes of the full blocks of the known tokens (grown lazily),
        # how many of this request's blocks are registered, and the cached block the next
        # registration chains onto (-1: none yet; -2: the chain is broken, stop caching).
        self.block_hashes: list[int] = []
        self.num_registered_blocks: int = 0
        self.cache_parent: int = -1
        # A decode's step delta (one token, no new block) is the same every step: built once
        # and reused by every plan (plans are read-only to the workers and the pool).
        self.decode_delta = CachedRequestData(request_id=self.request_id, num_scheduled_tokens=1)
        self.admitted_seq: int = 0  # order of (re)admission on its worker, for victim choice
        # Explanation of the scheduler's choices, returned with the final output.
        self.placement_scores: dict[int, float] = {}
        self.predicted_cached_tokens: int = 0

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs are asked for and not all sent yet."""
        return self.next_prompt_logprob < self.num_prompt_tokens

    def max_cached_blocks(self, block_size: int) -> int:
        """The most blocks of a cached prefix the request may start after: at least one
        token is always computed, and a request owed prompt logprobs must compute every
        position from the one that scores ``next_prompt_logprob`` (position ``next - 1``),
        so only the blocks before it may come from the cache (vLLM skips the cache for such
        requests altogether; this keeps the part already scored, after a preemption)."""
        limit = (self.num_tokens - 1) // block_size
        if self.next_prompt_logprob < self.num_prompt_tokens:
            limit = min(limit, (self.next_prompt_logprob - 1) // block_size)
        return limit

    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        """Known tokens ``[start, end)`` without copying the whole sequence."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return tuple(self.output_token_ids[start - n:end - n])
        return self.prompt_token_ids[start:] + tuple(self.output_token_ids[:end - n])

    def full_block_hashes(self, block_size: int) -> list[int]:
        """Chain hashes of every full block of the known tokens, each computed once per
        request: placement's probes of every worker, admission and registration all read
        this one list."""
        hashes = self.block_hashes
        num_full = self.num_tokens // block_size
        if len(hashes) < num_full:
            parent = hashes[-1] if hashes else ROOT_HASH
            prompt, salt = self.prompt_token_ids, self.cache_salt
            # Blocks inside the prompt are sliced from it directly (most of them, at add).
            in_prompt = min(num_full, len(prompt) // block_size)
            for start in range(len(hashes) * block_size, in_prompt * block_size, block_size):
                parent = chain_hash(parent, prompt[start:start + block_size], salt)
                hashes.append(parent)
            for i in range(len(hashes), num_full):
                parent = chain_hash(parent, self.token_slice(i * block_size, (i + 1) * block_size),
                                    salt)
                hashes.append(parent)
        return hashes

    def finished_by_outputs(self) -> str | None:
        """Why a continuation's outputs already end it, if they do ("stop": its last token
        stops it; "length": no room is left). A request resubmitted after its pool died
        never should, unless its finish was lost with the pool."""
        outputs = self.output_token_ids
        if (outputs and outputs[-1] in self.stop_ids
                and len(outputs) >= self.sampling.min_tokens):
            return "stop"
        if outputs and self.num_tokens >= self.max_num_tokens:
            return "length"
        return None

    def append_output(self, token_id: int) -> str | None:
        """Append a sampled token; return why the request stops now, if it does."""
        self.output_token_ids.append(token_id)
        self.num_tokens += 1
        if token_id in self.stop_ids and len(self.output_token_ids) >= self.sampling.min_tokens:
            return "stop"
        if self.num_tokens >= self.max_num_tokens:
            return "length"
        return None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, worker={self.worker_id}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens}, blocks={len(self.block_ids)})"
        )
