"""Batched next-token sampling for one step.

Per row, in this order (the order of Hugging Face's logits processors and vLLM's sampler):
the grammar's token mask (structured outputs, ``engine/worker/structured.py``), repetition
penalty over every known token (prompt and output), min_tokens masking of the stop ids
(not on constrained rows: their grammar decides where they end), then greedy argmax (temperature 0) or temperature, top-k, top-p and a draw.

Cost model: a greedy batch with no penalties is one ``argmax`` over ``[batch, vocab]`` and
one ``tolist``; the only per-row Python is reading each row's parameters, no per-row tensor
op. Rows with a penalty or a min_tokens mask touch only their own row.
Sampling rows share one sort (top-k/top-p) and one softmax over the batch; the draw is the
exponential race ``argmax(p / E)``, ``E ~ Exp(1)``, equivalent to sampling from ``p`` and
vectorised: only the noise differs per row.

Reproducibility: the noise of a seeded request's n-th output token comes from a CPU
``torch.Generator`` seeded from ``(seed, n)`` alone, so it does not depend on the batch, the
worker (CPU or GPU) or preemption. Unseeded rows draw from one worker generator.

Logprobs are those of the raw model distribution (``log_softmax`` of the unprocessed logits,
vLLM's default), for the chosen token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.messages import SamplingParams
from engine.worker.structured import apply_bitmask

_MASK64 = (1 << 64) - 1


class SamplingRow(Protocol):
    """What the sampler needs to know about one request (the runner's request state)."""

    sampling: SamplingParams
    #: Every known token: prompt and output so far (the repetition penalty's history).
    token_ids: list[int]
    #: Output tokens produced before the one being sampled (its index n).
    num_output_tokens: int


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    #: The chosen tokens' logprobs (0.0 for rows that did not ask), or None if no row asked.
    logprobs: list[float] | None
    #: Per row, its ``logprobs`` most likely tokens and their logprobs (empty for rows that
    #: asked for none), or None if no row asked for any.
    top_token_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


def seed_for_token(seed: int, n: int) -> int:
    """A well-mixed 64-bit generator seed for output token ``n`` of a request seeded ``seed``
    (splitmix64 finaliser over the pair)."""
    return _splitmix64((_splitmix64(seed & _MASK64) + n) & _MASK64)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Sampler:
    def __init__(self, eos_token_ids: Sequence[int] = (), seed: int = 0) -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 grammar_bitmask: tuple[torch.Tensor, list[int]] | None = None) -> SamplerOutput:
        """Pick one token per row of ``logits`` (float32 ``[len(rows), vocab]``; modified in
        place). ``grammar_bitmask`` (``GrammarTable.bitmask``): the tokens each constrained
        row's grammar allows, applied first, so every later step (and the logprobs, as in
        vLLM) sees only those."""
        if grammar_bitmask is not None:
            apply_bitmask(logits, grammar_bitmask)
        params = [r.sampling for r in rows]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw_logprobs = logits.log_softmax(-1) if want_logprobs else None

        for i, r in enumerate(rows):
            p = r.sampling
            if p.repetition_penalty != 1.0:
                _repetition_penalty(logits[i], r.token_ids, p.repetition_penalty)
            # A grammar decides where a constrained output ends (its mask may allow only EOS).
            if r.num_output_tokens < p.min_tokens and p.structured is None:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
                if banned:
                    logits[i, banned] = float("-inf")

        greedy = [p.temperature == 0.0 for p in params]
        tokens = logits.argmax(-1)
        if not all(greedy):
            sampled = self._sample(logits, rows, greedy)
            tokens = torch.where(torch.tensor(greedy, device=logits.device), tokens, sampled)

        if raw_logprobs is None:
            return SamplerOutput(tokens.tolist(), None)
        chosen = raw_logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        logprobs = [lp if p.logprobs is not None else 0.0
                    for lp, p in zip(chosen, params, strict=True)]
        ks = [p.logprobs or 0 for p in params]
        if not any(ks):
            return SamplerOutput(tokens.tolist(), logprobs)
        top_lps, top_ids = raw_logprobs.topk(min(max(ks), raw_logprobs.shape[-1]), dim=-1)
        top_ids_rows, top_lps_rows = top_ids.tolist(), top_lps.tolist()
        return SamplerOutput(tokens.tolist(), logprobs,
                             [ids[:k] for ids, k in zip(top_ids_rows, ks, strict=True)],
                             [lps[:k] for lps, k in zip(top_lps_rows, ks, strict=True)])

    def _sample(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], greedy: list[bool]
    ) -> torch.Tensor:
        device = logits.device
        params = [r.sampling for r in rows]
        temps = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                             device=device)
        x = logits / temps[:, None]
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            x = _top_k_top_p(x, torch.tensor(top_k, device=device),
                             torch.tensor(top_p, device=device, dtype=x.dtype))
        probs = x.softmax(-1)
        return (probs / self._noise(rows, greedy, logits.shape[1], device)).argmax(-1)

    def _noise(
        self, rows: Sequence[SamplingRow], greedy: list[bool], vocab: int, device: torch.device
    ) -> torch.Tensor:
        """Exp(1) noise ``[batch, vocab]``: per-request generators for seeded rows, the worker
        generator for the rest, ones for greedy rows (unused, consumes no randomness)."""
        noise = torch.ones(len(rows), vocab, device=device)
        unseeded = [i for i, r in enumerate(rows) if not greedy[i] and r.sampling.seed is None]
        if unseeded:
            gen = self._worker_generator(device)
            noise[unseeded] = torch.empty(len(unseeded), vocab, device=device).exponential_(
                generator=gen
            )
        for i, r in enumerate(rows):
            seed = r.sampling.seed
            if greedy[i] or seed is None:
                continue
            gen = torch.Generator().manual_seed(seed_for_token(seed, r.num_output_tokens))
            noise[i] = torch.empty(vocab).exponential_(generator=gen).to(device)
        # Exp(1) may round to 0; a filtered token (p = 0) would then give 0/0 = NaN, which
        # argmax prefers.
        return noise.clamp_min_(1e-20)

    def _worker_generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device).manual_seed(self._seed)
            self._generators[device] = gen
        return gen


def _repetition_penalty(row: torch.Tensor, token_ids: list[int], penalty: float) -> None:
    """HF/CTRL penalty, in place: seen tokens' positive logits divided by ``penalty``,
    negative ones multiplied."""
    idx = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=row.device)
    if idx.numel() == 0:
        return
    seen = row[idx]
    row[idx] = torch.where(seen > 0, seen / penalty, seen * penalty)


def _top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf all but each row's ``top_k`` largest logits (0 = all) and then all but
    the smallest set whose probability reaches ``top_p`` (1 = all); ties at the cut stay.

    One ascending sort serves both filters; the result is scattered back to vocab order.
    """
    vocab = x.shape[1]
    sorted_x, order = x.sort(dim=-1)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    kth_largest = sorted_x.gather(1, (vocab - k)[:, None])
    sorted_x = sorted_x.masked_fill(sorted_x < kth_largest, float("-inf"))
    cum = sorted_x.softmax(-1).cumsum(-1)
    drop = cum <= (1 - top_p)[:, None]
    drop[:, -1] = False  # always keep the most likely token
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)
