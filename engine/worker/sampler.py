"""Batched next-token sampling for one step.

Per row, in this order (vLLM's sampler; ``_process_logits``): the grammar's token mask
(structured outputs, ``engine/worker/structured.py``), the ``allowed_token_ids`` mask,
``logit_bias``, min_tokens masking of the stop ids (not on constrained rows: their grammar
decides where they end), then the penalties (repetition over every known token, prompt and
output; then OpenAI's frequency and presence penalties over the output tokens so far:
``logit -= frequency * count + presence * (count > 0)``), then greedy argmax (temperature 0)
or temperature, top-k, top-p and a draw.

Cost model: a greedy batch with no processors is one ``argmax`` over ``[batch, vocab]`` and
one ``tolist``; the only per-row Python is reading each row's parameters, no per-row tensor
op. Each processor runs once for the rows that use it, vectorised over them: their token
lists are concatenated and scattered into ``[rows, vocab]`` counts or masks in one op (no
per-token Python); min_tokens masks touch only their own row.
Sampling rows share one sort (top-k/top-p) and one softmax over the batch; the draw is the
exponential race ``argmax(p / E)``, ``E ~ Exp(1)``, equivalent to sampling from ``p`` and
vectorised: only the noise differs per row.

Reproducibility: the noise of a seeded request's n-th output token comes from a CPU
``torch.Generator`` seeded from ``(seed, n)`` alone, so it does not depend on the batch, the
worker (CPU or GPU) or preemption. Unseeded rows draw from one worker generator.

Logprobs are those of the raw model distribution (``log_softmax`` of the unprocessed logits,
vLLM's default ``raw_logprobs``), for the chosen token: the allowed-ids mask, logit_bias,
penalties and temperature change which token is chosen, never the logprobs reported. The
one exception is a grammar's mask, applied before the logprobs (as in vLLM): a constrained
row reports the logprobs of the tokens its grammar allows.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.messages import PromptLogprobs, SamplingParams
from engine.worker.structured import apply_bitmask

_MASK64 = (1 << 64) - 1


class SamplingRow(Protocol):
    """What the sampler needs to know about one request (the runner's request state)."""

    sampling: SamplingParams
    #: Every known token: prompt and output so far (the repetition penalty's history).
    token_ids: list[int]
    #: Output tokens produced before the one being sampled (its index n); they are the last
    #: ``num_output_tokens`` of ``token_ids`` (the presence and frequency penalties' history,
    #: also after a preemption, when the request comes back with them in its tokens).
    num_output_tokens: int


@dataclass(frozen=True)
class PromptRows:
    """Logits rows of one request's prompt chunk that score prompt tokens ``first`` to
    ``first + len(target_ids) - 1`` (the row of position ``p`` scores token ``p + 1``)."""

    request_id: str
    first: int
    target_ids: list[int]
    k: int  # the request's prompt_logprobs


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

        _process_logits(logits, rows, self.eos_token_ids)

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


def _process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow],
                    eos_token_ids: tuple[int, ...]) -> None:
    """Every processor before temperature, in place, in vLLM's order: the allowed-ids mask,
    logit_bias, the min_tokens mask, the penalties. One pass over the rows' parameters picks
    the rows of each; a processor no row uses costs nothing."""
    allowed: list[int] = []
    biased: list[int] = []
    penalised: list[int] = []
    for i, r in enumerate(rows):
        p = r.sampling
        if p.allowed_token_ids:
            allowed.append(i)
        if p.logit_bias:
            biased.append(i)
        # A grammar decides where a constrained output ends (its mask may allow only EOS).
        if r.num_output_tokens < p.min_tokens and p.structured is None:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            if banned:
                logits[i, banned] = float("-inf")
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            penalised.append(i)
    # The min_tokens mask (-inf) commutes with the allowed mask and the bias: applied in the
    # same pass, the result is the order above.
    if allowed:
        _mask_disallowed(logits, [rows[i].sampling.allowed_token_ids for i in allowed], allowed)
    if biased:
        _add_logit_bias(logits, [rows[i].sampling.logit_bias for i in biased], biased)
    if penalised:
        apply_penalties(logits, [rows[i] for i in penalised], penalised)


def _scatter_index(lists: Sequence[Sequence[int]], device: torch.device,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index tensors of several token lists, row ``j`` for ``lists[j]``: one
    flat tensor per axis, built without per-token Python."""
    lengths = torch.tensor([len(x) for x in lists])
    flat = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(lists)), lengths)
    return rows.to(device), flat.to(device)


def _mask_disallowed(logits: torch.Tensor, allowed: Sequence[Sequence[int]],
                     idx: list[int]) -> None:
    """Only the listed tokens stay; every other logit of those rows becomes -inf."""
    keep = torch.zeros(len(idx), logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[_scatter_index(allowed, logits.device)] = True
    index = torch.tensor(idx, device=logits.device)
    logits[index] = logits[index].masked_fill(~keep, float("-inf"))


def _add_logit_bias(logits: torch.Tensor, biases: Sequence[tuple[tuple[int, float], ...]],
                    idx: list[int]) -> None:
    """``logit[token] += bias`` for each row's (token, bias) pairs (token ids are distinct
    within a row: the frontend and ``LLM`` refuse duplicates)."""
    rows, tokens = _scatter_index([[t for t, _ in b] for b in biases], logits.device)
    values = torch.tensor([v for b in biases for _, v in b], dtype=logits.dtype,
                          device=logits.device)
    index = torch.tensor(idx, device=logits.device)
    logits.index_put_((index[rows], tokens), values, accumulate=True)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow], idx: list[int]) -> None:
    """The repetition penalty (HF/CTRL: a seen token's positive logit divided by it, a
    negative one multiplied), over every known token; then OpenAI's frequency and presence
    penalties over the output tokens (the last ``num_output_tokens`` of ``token_ids``), in
    vLLM's order and arithmetic: ``x -= frequency * count``, then ``x -= presence * seen``."""
    device = logits.device
    index = torch.tensor(idx, device=device)
    x = logits[index]
    params = [r.sampling for r in rows]
    vocab = logits.shape[1]
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
        seen[_scatter_index([r.token_ids for r in rows], device)] = True
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        outputs = [r.token_ids[len(r.token_ids) - r.num_output_tokens:] if r.num_output_tokens
                   else [] for r in rows]
        counts = torch.zeros(len(rows), vocab, dtype=x.dtype, device=device)
        r_idx, t_idx = _scatter_index(outputs, device)
        counts.index_put_((r_idx, t_idx), torch.ones_like(t_idx, dtype=x.dtype),
                          accumulate=True)
        frequency = torch.tensor([p.frequency_penalty for p in params], dtype=x.dtype,
                                 device=device)[:, None]
        presence = torch.tensor([p.presence_penalty for p in params], dtype=x.dtype,
                                device=device)[:, None]
        x -= frequency * counts
        x -= presence * (counts > 0).to(x.dtype)
    logits[index] = x


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


def prompt_logprobs(logits: torch.Tensor, rows: Sequence[PromptRows]) -> list[PromptLogprobs]:
    """Prompt logprobs from the float32 logits of prompt positions (``rows`` in order, each
    ``len(target_ids)`` rows): per position the log_softmax of the raw logits at the next
    prompt token, its rank (vLLM's: tokens at least as likely, itself included) and the
    request's ``k`` best. One log_softmax, gather, comparison and top-k for the whole batch;
    only requests that ask for prompt logprobs have rows here."""
    lps = logits.log_softmax(-1)
    targets = torch.tensor([t for r in rows for t in r.target_ids], device=logits.device)
    chosen = lps.gather(1, targets[:, None])
    ranks = (lps >= chosen).sum(-1).tolist()
    chosen_list = chosen[:, 0].tolist()
    k = min(max(r.k for r in rows), lps.shape[-1])
    top_lps: list[list[float]] = []
    top_ids: list[list[int]] = []
    if k:
        values, indices = lps.topk(k, dim=-1)
        top_lps, top_ids = values.tolist(), indices.tolist()
    out = []
    start = 0
    for r in rows:
        end = start + len(r.target_ids)
        out.append(PromptLogprobs(
            request_id=r.request_id, first=r.first, token_logprobs=chosen_list[start:end],
            ranks=ranks[start:end],
            top_token_ids=[row[: r.k] for row in top_ids[start:end]] if r.k else [],
            top_logprobs=[row[: r.k] for row in top_lps[start:end]] if r.k else [],
        ))
        start = end
    return out
