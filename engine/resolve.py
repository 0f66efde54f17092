"""Resolve every "auto" of a config once, before any process starts.

``resolve_config`` is called by the launcher, by torchrun's ranks and by ``LLM``; what it
returns is the one config every process gets (the pools, the workers and the frontend
never decide a value again, so they cannot disagree):

- ``--device auto`` becomes ``cuda`` or ``cpu``;
- ``--block-size`` not given: the vllm runner on CPU gets 32-token blocks (vLLM's CPU
  attention kernel needs a multiple of 32); an explicit size is kept or refused;
- ``--cuda-graph-max-batch`` not given: ``--max-num-seqs``, at most 256 (``EngineConfig``);
- each model's ``max_model_len``: its context, at most its sliding window and, for the vllm
  runner, what its KV cache holds (``engine.models.info.context_length``, the one check);
- what can be refused now is refused, naming the flag: the policy, a tensor-parallel size
  that does not split the model, a block size the runner cannot use.

(vLLM's ``EngineArgs.create_engine_config`` is the model: flags in, one resolved config out.)
"""

from __future__ import annotations

import dataclasses
import logging

from engine.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, replace
from engine.models.info import ModelInfo, context_length, load_model_info, read_hf_config

log = logging.getLogger(__name__)

#: vLLM's CPU attention kernel needs blocks of a multiple of this many tokens.
VLLM_CPU_BLOCK_MULTIPLE = 32
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_bytes(dtype: str, device: str) -> int:
    """Bytes per KV element: ``auto`` is float32 on CPU and bfloat16 on CUDA (as
    ``engine.models.loader.resolve_dtype``)."""
    if dtype == "auto":
        return 4 if device == "cpu" else 2
    return _DTYPE_BYTES[dtype]


def vllm_num_blocks(cache: CacheConfig, info: ModelInfo, dtype: str, device: str) -> int:
    """KV blocks the vllm runner asks vLLM for (besides vLLM's reserved block 0)."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = info.kv_bytes_per_block(cache.block_size, dtype_bytes(dtype, device))
    return int(cache.kv_cache_memory_gib * (1 << 30)) // per_block - 1


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


def resolve_config(cfg: EngineConfig) -> EngineConfig:
    """``cfg`` with every auto value decided and checked (module docstring). Idempotent."""
    from engine.scheduler.policy import get_policy

    get_policy(cfg.scheduler.policy)
    cfg = replace(cfg, worker={"device": resolve_device(cfg.worker.device)})
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
