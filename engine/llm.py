"""The in-process API: the same scheduler and model runner in one process, for scripts,
tests and batch jobs (in the spirit of vLLM's ``LLM``)::

    from engine import LLM, SamplingParams
    llm = LLM()                                   # the embedded default model
    outs = llm.generate(["def add(a, b):"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].text)

With ``workers=N`` it builds N runners (each with its own weights and KV cache) and steps
them in turn from one thread: placement and preemption behave as in the served engine.
The drive loop is the engine core's (engine/core.py: each runner an ``InProcess`` handle)
and each request's text, stop strings and logprob pairing its ``OutputTail``'s
(engine/output_tail.py), both shared with the served engine.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.chat import chat_prompt_ids
from engine.cli import config_from_dict
from engine.config import EngineConfig
from engine.core import CoreObserver, EngineCore, InProcess
from engine.frontend.serving import check_sampling
from engine.messages import EngineRequest, RequestOutput, SamplingParams
from engine.models.info import ModelInfo, load_model_info
from engine.output_tail import OutputTail
from engine.prompt_logprobs import PromptLogprob
from engine.scheduler.record import flush_recording, open_scheduler
from engine.structured import InvalidSpec, check_spec
from engine.worker.runner import ModelRunner

Prompt = str | Sequence[int]


@dataclass
class CompletionOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[float] | None = None
    #: Per token, the most likely tokens as (token id, logprob), best first (``logprobs=k``).
    top_logprobs: list[list[tuple[int, float]]] | None = None
    #: With ``prompt_logprobs=k``: per prompt token (None for the first) its logprob, rank
    #: and the k most likely tokens (``max_tokens=0`` scores the prompt only).
    prompt_logprobs: list[PromptLogprob | None] | None = None
    error: str = ""


class LLM:
    def __init__(self, model: str | None = None, *, workers: int = 1,
                 observer: CoreObserver | None = None, **options: Any) -> None:
        """``options`` take the launcher's flag names in snake_case (``num_kv_blocks``,
        ``max_num_batched_tokens``, ``block_size``, ``dtype``, ``policy``, ...);
        ``observer`` sees every scheduler input and decision (engine/core.py)."""
        from transformers import AutoTokenizer

        from engine.resolve import resolve_config
        from engine.worker.factory import make_runner

        values: dict[str, Any] = {"workers": workers, **options}
        if model is not None:
            values["model"] = [model]
        self.config: EngineConfig = resolve_config(config_from_dict(values))
        model_cfg = self.config.models[0]
        self.info: ModelInfo = load_model_info(model_cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.info.path))
        self.runners: list[ModelRunner] = [
            make_runner(model_cfg, self.config.cache, self.config.worker, self.config.scheduler)
            for _ in range(workers)
        ]
        self.scheduler = open_scheduler(self.config.scheduler,
                                        block_size=self.config.cache.block_size,
                                        max_model_len=self.info.max_model_len,
                                        record_path=self.config.scheduler.record_decisions)
        self.core = EngineCore(self.scheduler, observer)
        for w, runner in enumerate(self.runners):
            self.core.add_worker(w, InProcess(runner.step), runner.num_blocks, time.time())
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: int = 0,
    ) -> list[CompletionOutput]:
        """Run every prompt to completion; outputs come back in the order of ``prompts``.

        Sampling parameters are checked as the HTTP API checks them, before any request is
        queued: ``engine.frontend.serving.InvalidRequest`` (a ValueError) names the bad one."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompt_list = list(prompts)  # type: ignore[arg-type]
        params = (
            list(sampling_params) if isinstance(sampling_params, Sequence)
            else [sampling_params or SamplingParams()] * len(prompt_list)
        )
        if len(params) != len(prompt_list):
            raise ValueError(f"got {len(params)} sampling params for {len(prompt_list)} prompts")
        for sp in params:  # the HTTP and gRPC APIs' checks, before anything is queued
            check_sampling(sp, self.info.vocab_size)
        for sp in {p.structured for p in params if p.structured is not None}:
            try:
                check_spec(sp)
            except InvalidSpec as e:
                raise ValueError(f"SamplingParams.structured ({sp.kind}) is invalid: {e}") from None
        results: dict[str, CompletionOutput] = {}
        tails: dict[str, OutputTail] = {}
        core = self.core
        now = time.time()
        for prompt, sp in zip(prompt_list, params, strict=True):
            rid = f"llm-{next(self._ids)}"
            ids = (list(self.tokenizer.encode(prompt))
                   if isinstance(prompt, str) else [int(t) for t in prompt])
            results[rid] = CompletionOutput(rid, prompt if isinstance(prompt, str) else None, ids)
            tail = tails[rid] = OutputTail(self.tokenizer, ids, sp)
            if tail.prompt_logprobs is not None:  # filled in place as the chunks arrive
                results[rid].prompt_logprobs = tail.prompt_logprobs.entries
            core.add(EngineRequest(request_id=rid, prompt_token_ids=tuple(ids), sampling=sp,
                                   priority=priority, arrival_time=now,
                                   eos_token_ids=self.info.eos_token_ids), now)
            self._apply(core.take_outputs(), results, tails)
        while core.num_unfinished:
            core.step(time.time())
            self._apply(core.take_outputs(), results, tails)
        self._apply(core.take_outputs(), results, tails)  # the last stop string's abort
        flush_recording(self.scheduler)
        return list(results.values())

    def chat(self, messages: Sequence[Mapping[str, Any]],
             sampling_params: SamplingParams | None = None, *,
             priority: int = 0) -> CompletionOutput:
        """One reply to ``messages``, rendered with the model's chat template exactly as the
        HTTP API's ``/v1/chat/completions`` renders them."""
        ids = chat_prompt_ids(self.tokenizer, messages)
        return self.generate([ids], sampling_params, priority=priority)[0]

    def _apply(self, outputs: list[RequestOutput], results: dict[str, CompletionOutput],
               tails: dict[str, OutputTail]) -> None:
        for o in outputs:
            delta = tails[o.request_id].feed(o)
            if delta is None:
                continue  # nothing new, or already ended by a stop string
            res = results[o.request_id]
            res.token_ids += delta.token_ids
            if delta.logprobs is not None:
                res.logprobs = (res.logprobs or []) + delta.logprobs
            if delta.top_logprobs is not None:
                res.top_logprobs = (res.top_logprobs or []) + delta.top_logprobs
            if delta.abort:  # a stop string matched: the scheduler still runs it
                self.core.abort([o.request_id], time.time())
            if delta.finish_reason is not None:
                res.finish_reason = delta.finish_reason
                res.error = o.error
                res.text = tails[o.request_id].text
                assert delta.usage is not None
                res.num_cached_tokens = delta.usage.cached_tokens
