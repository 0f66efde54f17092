"""Start and stop vLLM's own worker as vLLM's engine core does for one in-process worker
(``UniProcExecutor`` + ``EngineCore._initialize_kv_caches``):

    EngineArgs(...).create_engine_config()      model, dtype, block size, KV budget
    WorkerWrapperBase(rpc_rank=0)
      .init_worker / .init_device / .load_model
      .get_kv_cache_spec / .determine_available_memory
    get_kv_cache_configs(...)                   -> exactly our number of blocks (+ block 0)
      .initialize_from_config / .compile_or_warm_up_model

The KV budget is always explicit (``kv_cache_memory_bytes``: our blocks plus vLLM's block
0), so ``VLLM_CPU_KVCACHE_SPACE`` is not needed. Workers in one process share vLLM's
``torch.distributed`` world (``LLM(workers=2, runner="vllm")`` builds two): the first
creates it, the last tears it down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import ConfigError
from engine.worker.vllm.checks import check_kv_config


@dataclass(frozen=True)
class EngineLimits:
    """What vLLM sizes its engine and persistent buffers by."""

    max_model_len: int
    block_size: int
    kv_cache_memory_bytes: int
    max_num_batched_tokens: int
    max_num_seqs: int
    enforce_eager: bool
    attention_backend: str | None


def vllm_engine_config(model: str, dtype: torch.dtype, seed: int, limits: EngineLimits) -> Any:
    """vLLM's ``VllmConfig`` for one worker driven by our plans."""
    from vllm.engine.arg_utils import EngineArgs

    from engine.worker.vllm.penalties import ResumedPenalties

    return EngineArgs(
        model=model,
        dtype=str(dtype).removeprefix("torch."),
        seed=seed,
        max_model_len=limits.max_model_len,
        block_size=limits.block_size,
        kv_cache_memory_bytes=limits.kv_cache_memory_bytes,
        enable_prefix_caching=False,  # our scheduler does it; vLLM's worker needs none
        async_scheduling=False,
        max_num_batched_tokens=limits.max_num_batched_tokens,
        max_num_seqs=limits.max_num_seqs,
        enforce_eager=limits.enforce_eager,
        disable_log_stats=True,
        skip_tokenizer_init=True,
        generation_config="vllm",  # sampling defaults are ours, not the model's
        attention_backend=limits.attention_backend,
        # a resumed request's frequency/presence penalties (engine/worker/vllm/penalties.py)
        logits_processors=[ResumedPenalties],
    ).create_engine_config()


@dataclass
class StartedWorker:
    """vLLM's worker, the KV blocks it allocated (ours + block 0) and its rendezvous file."""

    worker: Any
    num_blocks: int
    dist_file: str


class VllmWorkers:
    """vLLM workers alive in this process (they share its ``torch.distributed`` world)."""

    live = 0


def start_worker(config: Any, device: torch.device, threads: int) -> StartedWorker:
    """vLLM's worker for ``config`` on ``device``, with ``threads`` intra-op threads."""
    set_num_threads = torch.set_num_threads
    torch.set_num_threads(threads)
    try:
        VllmWorkers.live += 1
        return _start(config, device)
    except BaseException:
        VllmWorkers.live -= 1
        raise
    finally:
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole
        # process once it has bound its threads; give it back to other code.
        torch.set_num_threads = set_num_threads


def _start(config: Any, device: torch.device) -> StartedWorker:
    from vllm.platforms import current_platform
    from vllm.utils.network_utils import get_file_store_init_method
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    block_size = config.cache_config.block_size
    local_rank = (device.index or 0) if device.type == "cuda" else 0
    worker = WorkerWrapperBase(rpc_rank=0)
    # A FileStore rendezvous in a fresh temp file per worker: a world of one, no port, so
    # any number of workers (and vLLM's CPU shared-memory names, derived from the file
    # name) never clash on one machine.
    dist_file = get_file_store_init_method()
    worker.init_worker(all_kwargs=[dict(
        vllm_config=config, local_rank=local_rank, rank=0,
        distributed_init_method=dist_file, is_driver_worker=True,
    )])
    worker.init_device()
    worker.load_model()
    current_platform.update_block_size_for_backend(config)
    if config.cache_config.block_size != block_size:
        raise ConfigError(f"--block-size: vLLM's attention backend needs blocks of "
                          f"{config.cache_config.block_size} tokens, not {block_size}")
    num_blocks = _initialize_kv_cache(worker, config)
    worker.compile_or_warm_up_model()
    return StartedWorker(worker, num_blocks, dist_file)


def _initialize_kv_cache(worker: Any, config: Any) -> int:
    """Allocate the KV cache vLLM's engine core would for this one worker; its blocks."""
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import (
        generate_scheduler_kv_cache_config,
        get_kv_cache_configs,
        resolve_cache_hit_alignment_tokens,
        resolve_kv_cache_block_sizes,
    )
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs

    register_all_kvcache_specs(config)
    spec = worker.get_kv_cache_spec()
    layout = resolve_kv_cache_layout(config, [worker.get_supported_kv_cache_layouts()],
                                     spec.values())
    worker.set_kv_cache_layout(layout.name)
    available = worker.determine_available_memory()
    (kv_config,) = get_kv_cache_configs(config, [spec], [available])
    kv_config.kv_cache_layout = config.cache_config.kv_cache_layout
    check_kv_config(kv_config, config.model_config.model)
    sched_config = generate_scheduler_kv_cache_config([kv_config])
    scheduler_bs, hash_bs = resolve_kv_cache_block_sizes(sched_config, config)
    kv_config.hash_block_size = hash_bs
    kv_config.cache_hit_alignment_tokens = resolve_cache_hit_alignment_tokens(
        sched_config, config, scheduler_bs, hash_bs)
    config.cache_config.num_gpu_blocks = kv_config.num_blocks
    worker.initialize_from_config([kv_config])
    num_blocks: int = kv_config.num_blocks
    return num_blocks


def stop_worker(started: StartedWorker) -> None:
    """Shut the worker down; the last one in the process tears vLLM's world down."""
    try:
        started.worker.shutdown()
    finally:
        VllmWorkers.live -= 1
        if VllmWorkers.live == 0:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        path = started.dist_file.removeprefix("file://")
        if os.path.exists(path):
            os.unlink(path)
