"""Build the model runner a worker config asks for, and resolve what the runner decides in
the config before any process starts (``resolve_runner_config``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from engine.config import (
    RUNNERS,
    CacheConfig,
    ConfigError,
    EngineConfig,
    ModelConfig,
    WorkerConfig,
    replace,
)
from engine.worker.runner import ModelRunner

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from engine.models.parallel import TensorParallel


def make_runner(
    model_config: ModelConfig,
    cache_config: CacheConfig,
    worker_config: WorkerConfig,
    *,
    device: str | None = None,
    tp: TensorParallel | None = None,
) -> ModelRunner:
    """The runner named by ``worker_config.runner``; ``device`` (e.g. ``"cuda:1"``) overrides
    ``worker_config.device`` for workers pinned to one GPU; ``tp``: this process's place in a
    tensor-parallel group. Runners import lazily: each pulls
    in heavy dependencies (torch, vLLM) that only its own worker needs."""
    runner = worker_config.runner
    if runner == "native":
        from engine.worker.native_runner import NativeRunner

        return NativeRunner(model_config, cache_config, worker_config, device=device, tp=tp)
    if runner == "vllm":
        if tp is not None and tp.size > 1:
            raise ConfigError("--tensor-parallel-size: only the native runner splits a model "
                              "over ranks so far")
        from engine.worker.vllm_plan import VllmVersionError, check_vllm_version

        try:
            check_vllm_version()  # before importing anything of vLLM's: a clear message
        except VllmVersionError as e:
            raise ConfigError(f"--runner: {e}") from e
        from engine.worker.vllm_runner import VllmRunner

        return VllmRunner(model_config, cache_config, worker_config, device=device)
    raise ConfigError(f"--runner: must be one of {RUNNERS}, got {runner!r}")


#: vLLM's CPU attention kernel needs blocks of a multiple of this many tokens.
VLLM_CPU_BLOCK_MULTIPLE = 32


def resolve_runner_config(cfg: EngineConfig) -> EngineConfig:
    """``cfg`` with what the runner decides filled in, then checked: called once, before any
    process or runner starts (the launcher, torchrun, ``LLM``), so that the pools and the
    workers all get the same values. The vllm runner on CPU without ``--block-size`` gets
    blocks of ``VLLM_CPU_BLOCK_MULTIPLE`` tokens (logged); an explicit size it cannot use is
    refused (ConfigError naming the flag)."""
    cache = cfg.cache
    if (cache.block_size_auto and _vllm_on_cpu(cfg.worker)
            and cache.block_size % VLLM_CPU_BLOCK_MULTIPLE):
        log.info("--runner vllm on CPU: KV blocks of %d tokens (vLLM's CPU attention kernel "
                 "needs a multiple of %d; --block-size sets another)",
                 VLLM_CPU_BLOCK_MULTIPLE, VLLM_CPU_BLOCK_MULTIPLE)
        cfg = replace(cfg, cache={"block_size": VLLM_CPU_BLOCK_MULTIPLE})
    check_runner_config(cfg.cache, cfg.worker)
    return cfg


def _vllm_on_cpu(worker_config: WorkerConfig) -> bool:
    if worker_config.runner != "vllm":
        return False
    device = worker_config.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device == "cpu"


def check_runner_config(cache_config: CacheConfig, worker_config: WorkerConfig) -> None:
    """What can be said about a runner's configuration before any worker starts (a vLLM
    import alone takes seconds): raises ConfigError naming the flag."""
    if _vllm_on_cpu(worker_config) and cache_config.block_size % VLLM_CPU_BLOCK_MULTIPLE:
        raise ConfigError(
            f"--block-size: the vllm runner on CPU needs a multiple of "
            f"{VLLM_CPU_BLOCK_MULTIPLE} (vLLM's CPU attention kernel), got "
            f"{cache_config.block_size}; use --block-size {VLLM_CPU_BLOCK_MULTIPLE}"
        )

