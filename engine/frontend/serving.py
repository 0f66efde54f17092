"""What every API of the frontend shares (gRPC and HTTP): the served models, request
validation, and the lifecycle of one request.

``generate`` sends a validated ``EngineRequest`` to its model's pool and yields ``Delta``s
(engine/output_tail.py, shared with ``engine.LLM``): new text (incrementally detokenized,
stop strings cut), new token ids, their logprobs, and on the last one the finish reason and
usage. Closing or cancelling the iterator before the end
(a client that went away, a timeout) aborts the request in its pool at once, which frees its
KV blocks. Latency and token metrics are recorded here, so every API reports them alike.

Validation raises ``InvalidRequest`` (naming the parameter), unknown models
``ModelNotFound``; each API maps them to its own status codes.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from engine.frontend.pool_client import PoolClient
from engine.messages import EngineRequest, SamplingParams
from engine.models.info import ModelInfo
from engine.output_tail import Delta as Delta  # re-exported: the APIs import it from here
from engine.output_tail import OutputTail

if TYPE_CHECKING:
    from engine.frontend.metrics import EngineMetrics

log = logging.getLogger(__name__)

#: max_tokens when a request does not say (clamped to the context left), as in OpenAI's API.
DEFAULT_MAX_TOKENS = 16
#: The most prompt logprobs per position a request may ask for (vLLM's default max_logprobs).
MAX_PROMPT_LOGPROBS = 20


class InvalidRequest(ValueError):
    """The request is malformed or out of range; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ModelNotFound(LookupError):
    def __init__(self, name: str, served: Sequence[str]) -> None:
        self.message = f"model {name!r} not found; served models: {', '.join(served)}"
        super().__init__(self.message)


class GenerationFailed(RuntimeError):
    """The pool reported an error for this request (``unavailable`` False), or the pool
    cannot be reached (``unavailable`` True: nothing ran, the client may retry)."""

    def __init__(self, message: str, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable


@dataclass
class ServedModel:
    info: ModelInfo
    tokenizer: Any  # a transformers tokenizer (or a tokenizers.Tokenizer)
    pool: PoolClient

    @property
    def name(self) -> str:
        return self.info.name


class ModelRegistry:
    """The served models by name, in config order; the first is the default."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        if not models:
            raise ValueError("the frontend needs at least one model")
        self.models = list(models)
        self._by_name = {m.name: m for m in self.models}

    def get(self, name: str | None) -> ServedModel:
        """The named model; the default one when ``name`` is empty."""
        if not name:
            return self.models[0]
        model = self._by_name.get(name)
        if model is None:
            raise ModelNotFound(name, list(self._by_name))
        return model

    def __iter__(self) -> Any:
        return iter(self.models)


# --------------------------------------------------------------------------- validation


def check(ok: bool, message: str, param: str | None = None) -> None:
    if not ok:
        raise InvalidRequest(message, param)


def sampling_params(
    *, vocab_size: int, temperature: float | None = None, top_p: float | None = None,
    top_k: int | None = None, min_tokens: int | None = None, seed: int | None = None,
    stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
    logprobs: int | None = None, repetition_penalty: float | None = None,
    presence_penalty: float | None = None, frequency_penalty: float | None = None,
    logit_bias: Mapping[Any, Any] | None = None, allowed_token_ids: Sequence[Any] | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """Validated sampling parameters; ``max_tokens`` is set by ``resolve_max_tokens`` (it
    depends on the prompt's length). ``None`` means the default. ``logit_bias`` maps token
    ids (ints, or OpenAI's decimal strings) to biases; ``allowed_token_ids``, when given,
    must list at least one id."""
    top_k = top_k or 0
    check(top_k >= 0 or top_k == -1, f"top_k must be >= 0 (0 or -1 disable it), got {top_k}",
          "top_k")
    check(allowed_token_ids is None or len(allowed_token_ids) > 0,
          "allowed_token_ids must list at least one token id", "allowed_token_ids")
    sp = SamplingParams(
        temperature=1.0 if temperature is None else _number(temperature, "temperature"),
        top_p=1.0 if top_p is None else _number(top_p, "top_p"), top_k=max(top_k, 0),
        min_tokens=min_tokens or 0, seed=seed, stop=tuple(stop),
        stop_token_ids=tuple(stop_token_ids), ignore_eos=ignore_eos, logprobs=logprobs,
        repetition_penalty=(1.0 if repetition_penalty is None
                            else _number(repetition_penalty, "repetition_penalty")),
        presence_penalty=(0.0 if presence_penalty is None
                          else _number(presence_penalty, "presence_penalty")),
        frequency_penalty=(0.0 if frequency_penalty is None
                           else _number(frequency_penalty, "frequency_penalty")),
        logit_bias=_logit_bias(logit_bias or {}),
        allowed_token_ids=tuple(_token_id(t, "allowed_token_ids")
                                for t in allowed_token_ids or ()),
        prompt_logprobs=prompt_logprobs,
    )
    check_sampling(sp, vocab_size)
    return sp


def check_sampling(sp: SamplingParams, vocab_size: int) -> None:
    """Every range check on sampling parameters, shared by the HTTP and gRPC APIs
    (``sampling_params``) and ``engine.LLM`` (which takes the struct itself): raises
    ``InvalidRequest`` (a ValueError) naming the parameter."""
    check(math.isfinite(sp.temperature) and sp.temperature >= 0,
          f"temperature must be >= 0, got {sp.temperature}", "temperature")
    check(0 < sp.top_p <= 1, f"top_p must be in (0, 1], got {sp.top_p}", "top_p")
    check(sp.top_k >= 0 or sp.top_k == -1,
          f"top_k must be >= 0 (0 or -1 disable it), got {sp.top_k}", "top_k")
    check(sp.min_tokens >= 0, f"min_tokens must be >= 0, got {sp.min_tokens}", "min_tokens")
    check(sp.logprobs is None or sp.logprobs >= 0, f"logprobs must be >= 0, got {sp.logprobs}",
          "logprobs")
    check(sp.prompt_logprobs is None or 0 <= sp.prompt_logprobs <= MAX_PROMPT_LOGPROBS,
          f"prompt_logprobs must be in [0, {MAX_PROMPT_LOGPROBS}], got {sp.prompt_logprobs}",
          "prompt_logprobs")
    penalty = sp.repetition_penalty
    check(math.isfinite(penalty) and penalty > 0,
          f"repetition_penalty must be > 0, got {penalty}", "repetition_penalty")
    check(all(sp.stop), "stop strings must not be empty", "stop")
    bad = [t for t in sp.stop_token_ids if not 0 <= t < vocab_size]
    check(not bad, f"stop_token_ids {bad[:8]} are outside the vocabulary (size {vocab_size})",
          "stop_token_ids")
    check(sp.seed is None or -(2**63) <= sp.seed < 2**64, "seed must fit in 64 bits", "seed")
    _check_output_controls(sp, vocab_size)


def _check_output_controls(sp: SamplingParams, vocab_size: int) -> None:
    """OpenAI's presence/frequency penalties and logit_bias, vLLM's allowed_token_ids."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(sp, name)
        check(math.isfinite(value) and -2 <= value <= 2,
              f"{name} must be in [-2, 2], got {value}", name)
    ids = [t for t, _ in sp.logit_bias]
    bad = sorted({t for t in ids if not 0 <= t < vocab_size})
    check(not bad, f"logit_bias token ids {bad[:8]} are outside the vocabulary (size "
          f"{vocab_size})", "logit_bias")
    check(len(set(ids)) == len(ids), "logit_bias lists a token id twice", "logit_bias")
    wild = [b for _, b in sp.logit_bias if not (math.isfinite(b) and -100 <= b <= 100)]
    check(not wild, f"logit_bias values must be in [-100, 100], got {wild[:8]}", "logit_bias")
    bad = sorted({t for t in sp.allowed_token_ids if not 0 <= t < vocab_size})
    check(not bad, f"allowed_token_ids {bad[:8]} are outside the vocabulary (size "
          f"{vocab_size})", "allowed_token_ids")


def _number(value: Any, param: str) -> float:
    check(isinstance(value, int | float) and not isinstance(value, bool),
          f"{param} must be a number, got {str(value)[:40]}", param)
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        raise InvalidRequest(f"{param} is out of range", param) from None


def _token_id(value: Any, param: str) -> int:
    """An int token id; OpenAI's logit_bias keys are decimal strings ("50256")."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    check(isinstance(value, int) and not isinstance(value, bool),
          f"{param}: token ids must be integers, got {str(value)[:40]!r}", param)
    return int(value)


def _logit_bias(bias: Mapping[Any, Any]) -> tuple[tuple[int, float], ...]:
    pairs = tuple((_token_id(t, "logit_bias"), _number(b, "logit_bias"))
                  for t, b in bias.items())
    check(len({t for t, _ in pairs}) == len(pairs), "logit_bias lists a token id twice "
          "(as two spellings of one key)", "logit_bias")
    return pairs


def encode_text(model: ServedModel, text: str, param: str = "prompt") -> list[int]:
    check(bool(text), f"{param} is empty", param)
    ids = model.tokenizer.encode(text)
    ids = list(getattr(ids, "ids", ids))
    check(bool(ids), f"{param} is empty after tokenization", param)
    return ids


def check_token_ids(model: ServedModel, ids: Sequence[int], param: str = "prompt") -> list[int]:
    check(len(ids) > 0, f"{param} is empty", param)
    vocab = model.info.vocab_size
    bad = sorted({t for t in ids if not 0 <= t < vocab})
    check(not bad, f"{param} token ids {bad[:8]} are outside the vocabulary (size {vocab})",
          param)
    return [int(t) for t in ids]


def resolve_max_tokens(requested: int | None, num_prompt: int, max_model_len: int,
                       param: str = "max_tokens", *, allow_zero: bool = False) -> int:
    """The request's output budget: ``requested`` if it fits the context, else an error;
    unset means ``DEFAULT_MAX_TOKENS`` clamped to the room left. 0 (the prompt's prefill
    only) only with ``allow_zero``: for a request whose answer is its prompt (echo) or its
    prompt logprobs."""
    room = max_model_len - num_prompt
    check(num_prompt <= max_model_len, f"prompt longer than the model's context: {num_prompt} "
          f"tokens, max_model_len is {max_model_len}", "prompt")
    check(room > 0, f"prompt fills the model's context ({num_prompt} tokens = max_model_len), "
          "no room to generate", "prompt")
    if requested is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if allow_zero:
        check(requested >= 0, f"{param} must be >= 0, got {requested}", param)
    else:
        check(requested >= 1, f"{param} must be >= 1, got {requested}"
              " (0 only with echo or prompt_logprobs)", param)
    check(requested <= room, f"prompt ({num_prompt} tokens) + {param} ({requested}) exceeds "
          f"the model's context (max_model_len {max_model_len})", param)
    return int(requested)


def engine_request(model: ServedModel, request_id: str, prompt_ids: Sequence[int],
                   sampling: SamplingParams, max_tokens: int, *, priority: int = 0,
                   tenant: str = "", cache_salt: str = "") -> EngineRequest:
    """The request as the pool receives it, under a fresh engine id (``<id>.<random>``) so
    that a client id reused right after its request ended never receives old outputs."""
    check(sampling.min_tokens <= max_tokens,
          f"min_tokens ({sampling.min_tokens}) must be <= max_tokens ({max_tokens})",
          "min_tokens")
    check(-(2**31) <= priority < 2**31, "priority must fit in 32 bits", "priority")
    return EngineRequest(
        request_id=f"{request_id}.{secrets.token_hex(4)}", prompt_token_ids=tuple(prompt_ids),
        sampling=msgspec.structs.replace(sampling, max_tokens=max_tokens), priority=priority,
        arrival_time=time.time(), eos_token_ids=model.info.eos_token_ids, tenant=tenant,
        cache_salt=cache_salt,
    )


# --------------------------------------------------------------------------- generation


async def generate(model: ServedModel, request: EngineRequest,
                   metrics: EngineMetrics | None = None) -> AsyncIterator[Delta]:
    """Run one request to its end, yielding its deltas (empty ones are skipped; the text,
    stop strings and logprob pairing are the ``OutputTail``'s: engine/output_tail.py).

    Raises ``GenerationFailed`` when the pool fails the request or cannot be reached. The
    request is aborted in its pool if the iterator is closed or cancelled before its last
    delta, so a client that goes away frees its KV blocks at once.
    """
    try:
        stream = model.pool.add(request)
    except RuntimeError as e:  # the pool client is closed or broken
        raise GenerationFailed(str(e), unavailable=True) from e
    tail = OutputTail(model.tokenizer, request.prompt_token_ids, request.sampling)
    timer = metrics.request_timer(model.name, request) if metrics else None
    done = False
    try:
        async for out in stream:
            if out.finish_reason == "error":
                done = True
                if timer:
                    timer.finish("error", tail.num_output_tokens, out.explanation)
                raise GenerationFailed(out.error or "the engine failed the request",
                                       unavailable=stream.unavailable)
            if timer and out.new_token_ids:
                timer.tokens(len(out.new_token_ids))
            delta = tail.feed(out)
            if delta is None:
                continue
            delta.timing = out.timing
            if delta.abort:  # a stop string matched: stop the pool
                model.pool.abort([request.request_id])
            if delta.finish_reason is not None:
                done = True
                if out.explanation is not None:
                    log.debug("request %s explanation: %s", request.request_id, out.explanation)
                if timer:
                    timer.finish(delta.finish_reason, tail.num_output_tokens, out.explanation,
                                 tail.num_cached_tokens)
                yield delta
                return
            yield delta
    finally:
        if not done:  # closed early: the client went away, a timeout, the server stopping
            model.pool.abort([request.request_id])
            if timer:
                timer.finish("abort", tail.num_output_tokens, None)
