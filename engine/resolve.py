"""Resolve every "auto" of a config once, before any process starts.

``resolve_config`` is called by the launcher, by torchrun's ranks and by ``LLM``; what it
returns is the one config every process gets (the pools, the workers and the frontend
never decide a value again, so they cannot disagree):

- ``--device auto`` becomes ``cuda`` or ``cpu``;
- ``--worker-sched auto``: ``idle`` (``SCHED_IDLE``) for CPU workers on Linux unless
  ``--worker-nice`` is given, ``normal`` otherwise (CPU workers share the cores with the
  frontend and the pool, which must run the moment they wake); ``--worker-nice`` not given:
  5 for CPU workers under ``normal``, 0 otherwise; ``--workers-share-cores auto``: ``yes``
  for CPU workers; ``--reserved-workers`` not given: 1 where the workers share cores and
  there are two or more, else 0;
- ``--block-size`` not given: the vllm runner on CPU gets 32-token blocks (vLLM's CPU
  attention kernel needs a multiple of 32); an explicit size is kept or refused;
- ``--cuda-graph-max-batch`` not given: ``--max-num-seqs``, at most 256 (``EngineConfig``);
- each model's ``max_model_len``: its context, at most its sliding window and, for the vllm
  runner, what its KV cache holds (``engine.models.info.context_length``, the one check);
- what can be refused now is refused, naming the flag: the policy, a tensor-parallel size
  that does not split the model, a block size the runner cannot use, reserved workers that
  leave none for sheddable requests.

(vLLM's ``EngineArgs.create_engine_config`` is the model: flags in, one resolved config out.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

from engine.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, replace
from engine.models.info import ModelInfo, context_length, load_model_info, read_hf_config

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: vLLM's CPU attention kernel needs blocks of a multiple of this many tokens.
VLLM_CPU_BLOCK_MULTIPLE = 32
#: ``--worker-nice`` of CPU workers under ``--worker-sched normal`` when not given.
CPU_WORKER_NICE = 5
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_device(device: str | torch.device) -> torch.device:
    """The device a runner runs on (``cuda:1``, ``cpu``; ``auto`` only for a runner built
    from an unresolved config, as tests do): the one place a worker turns its device name
    into a ``torch.device`` and checks that CUDA is there (ValueError)."""
    import torch

    dev = torch.device(resolve_device(device) if isinstance(device, str) else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return dev


def dtype_bytes(dtype: str, device: str) -> int:
    """Bytes per KV element: ``auto`` is float32 on CPU and bfloat16 on CUDA (as
    ``engine.models.loader.resolve_dtype``)."""
    if dtype == "auto":
        return 4 if device == "cpu" else 2
    return _DTYPE_BYTES[dtype]


def kv_cache_blocks(cache: CacheConfig, info: ModelInfo, dtype_bytes: int, *,
                    tp_size: int = 1, reserved: int = 0, check: bool = True) -> int:
    """KV blocks of ``cache.block_size`` tokens a runner allocates: ``--num-kv-blocks``, or
    as many as ``--kv-cache-memory`` holds (each tensor-parallel rank holds its share of the
    KV heads), less ``reserved`` (vLLM's null block 0). The one sizing of the KV cache, for
    both runners and for the context ``resolve_config`` decides. ``check``: refuse fewer
    than 2 (ConfigError naming the flags)."""
    if cache.num_blocks is not None:
        blocks = cache.num_blocks
    else:
        per_block = info.kv_bytes_per_block(cache.block_size, dtype_bytes) // tp_size
        blocks = int(cache.kv_cache_memory_gib * (1 << 30)) // per_block - reserved
    if check and blocks < 2:
        if cache.num_blocks is not None:
            raise ConfigError(f"--num-kv-blocks: at least 2 are needed, got {blocks}")
        besides = f" besides {reserved} reserved" if reserved else ""
        raise ConfigError(
            f"--kv-cache-memory: {cache.kv_cache_memory_gib} GiB holds {blocks} blocks of "
            f"{cache.block_size} tokens{besides}; at least 2 are needed (raise "
            f"--kv-cache-memory or set --num-kv-blocks)")
    return blocks


def vllm_num_blocks(cache: CacheConfig, info: ModelInfo, dtype: str, device: str) -> int:
    """KV blocks the vllm runner asks vLLM for (besides vLLM's reserved block 0)."""
    return kv_cache_blocks(cache, info, dtype_bytes(dtype, device), reserved=1, check=False)


def model_context(model: ModelConfig, cfg: EngineConfig) -> int:
    """``max_model_len`` of ``model`` under ``cfg``'s runner (raises ConfigError)."""
    hf = read_hf_config(model)
    capacity = None
    if cfg.worker.runner == "vllm":
        # vLLM sizes its block tables by max_model_len and refuses a KV cache too small for
        # one request of that length.
        info = load_model_info(dataclasses.replace(model, max_model_len=None))
        blocks = vllm_num_blocks(cfg.cache, info, model.dtype, cfg.worker.device)
        capacity = (max(0, blocks) * cfg.cache.block_size, "KV cache capacity with --runner vllm")
    return context_length(hf, model.max_model_len, capacity)


def resolve_worker_sched(device: str, sched: str, nice: int | None) -> dict[str, object]:
    """The workers' ``sched`` and ``nice``, resolved for a resolved ``device``: on CPU they
    yield the cores to the frontend and the pool (``SCHED_IDLE`` where the OS has it, unless
    a nice level is asked for)."""
    if sched == "auto":
        idle = device == "cpu" and nice is None and hasattr(os, "SCHED_IDLE")
        sched = "idle" if idle else "normal"
    if sched == "idle" and not hasattr(os, "SCHED_IDLE"):
        raise ConfigError("--worker-sched: idle needs Linux's SCHED_IDLE, which this OS has "
                          "not; give --worker-sched normal")
    if nice is None:
        nice = CPU_WORKER_NICE if device == "cpu" and sched == "normal" else 0
    return {"sched": sched, "nice": nice}


def resolve_reserved_workers(reserved: int | None, share_cores: str, num_workers: int) -> int:
    """``--reserved-workers``: not given, 1 where the workers share cores and there are two
    or more (there, critical latency under a flood needs it: docs/benchmarks.md, "Flood",
    ninth pass), else 0 (a reserved device would idle). A count must leave a worker for
    sheddable requests."""
    if reserved is None:
        return int(share_cores == "yes" and num_workers > 1)
    if reserved and reserved >= num_workers:
        raise ConfigError(f"--reserved-workers: must leave a worker for sheddable requests: "
                          f"at most {num_workers - 1} of --workers {num_workers}, got "
                          f"{reserved}")
    return reserved


def resolve_config(cfg: EngineConfig) -> EngineConfig:
    """``cfg`` with every auto value decided and checked (module docstring). Idempotent."""
    from engine.scheduler.policy import get_policy

    get_policy(cfg.scheduler.policy)
    cfg = replace(cfg, worker={"device": resolve_device(cfg.worker.device)})
    cfg = replace(cfg, worker=resolve_worker_sched(cfg.worker.device, cfg.worker.sched,
                                                   cfg.worker.nice))
    if cfg.scheduler.workers_share_cores == "auto":
        share = "yes" if cfg.worker.device == "cpu" else "no"
        cfg = replace(cfg, scheduler={"workers_share_cores": share})
    cfg = replace(cfg, scheduler={"reserved_workers": resolve_reserved_workers(
        cfg.scheduler.reserved_workers, cfg.scheduler.workers_share_cores,
        cfg.worker.num_workers)})
    cache = cfg.cache
    vllm_cpu = cfg.worker.runner == "vllm" and cfg.worker.device == "cpu"
    if cache.block_size_auto and vllm_cpu and cache.block_size % VLLM_CPU_BLOCK_MULTIPLE:
        log.info("--runner vllm on CPU: KV blocks of %d tokens (vLLM's CPU attention kernel "
                 "needs a multiple of %d; --block-size sets another)",
                 VLLM_CPU_BLOCK_MULTIPLE, VLLM_CPU_BLOCK_MULTIPLE)
        cfg = replace(cfg, cache={"block_size": VLLM_CPU_BLOCK_MULTIPLE})
    check_block_size(cfg.cache.block_size, cfg.worker.runner, cfg.worker.device)
    models = []
    for model in cfg.models:
        load_model_info(model).check_tensor_parallel(cfg.worker.tensor_parallel_size)
        models.append(dataclasses.replace(model, max_model_len=model_context(model, cfg)))
    return dataclasses.replace(cfg, models=tuple(models)).validate()


def check_block_size(block_size: int, runner: str, device: str) -> None:
    """Refuse a block size the runner cannot use (ConfigError naming the flag)."""
    if runner == "vllm" and device == "cpu" and block_size % VLLM_CPU_BLOCK_MULTIPLE:
        raise ConfigError(
            f"--block-size: the vllm runner on CPU needs a multiple of "
            f"{VLLM_CPU_BLOCK_MULTIPLE} (vLLM's CPU attention kernel), got {block_size}; "
            f"use --block-size {VLLM_CPU_BLOCK_MULTIPLE}")
