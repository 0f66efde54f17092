"""Build the model runner a worker config asks for. What a runner needs decided (its block
size on CPU, the context it holds, the device) is decided before any process starts, in
``engine.resolve``.

Imports go one way: this module imports ``engine.worker.native_runner`` or the
``engine.worker.vllm`` package lazily (each pulls in torch or vLLM), and neither imports it."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from engine.config import (
    RUNNERS,
    CacheConfig,
    ConfigError,
    ModelConfig,
    SchedulerConfig,
    WorkerConfig,
    cuda_graph_default,
)
from engine.worker.runner import ModelRunner

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from engine.models.parallel import TensorParallel


def make_runner(
    model_config: ModelConfig,
    cache_config: CacheConfig,
    worker_config: WorkerConfig,
    scheduler_config: SchedulerConfig | None = None,
    *,
    device: str | None = None,
    tp: TensorParallel | None = None,
) -> ModelRunner:
    """The runner named by ``worker_config.runner``; ``device`` (e.g. ``"cuda:1"``) overrides
    ``worker_config.device`` for workers pinned to one GPU; ``tp``: this process's place in a
    tensor-parallel group. ``scheduler_config``'s per-step limits (the largest plan a runner
    must take: ``--max-num-batched-tokens``, ``--max-num-seqs``) size the vllm runner's
    buffers. Runners import lazily: each pulls in heavy dependencies (torch, vLLM) that only
    its own worker needs."""
    scheduler_config = scheduler_config or SchedulerConfig()
    if worker_config.cuda_graph_max_batch is None:
        worker_config = dataclasses.replace(
            worker_config, cuda_graph_max_batch=cuda_graph_default(scheduler_config))
    runner = worker_config.runner
    if runner == "native":
        from engine.worker.native_runner import NativeRunner

        return NativeRunner(model_config, cache_config, worker_config, device=device, tp=tp)
    if runner == "vllm":
        if tp is not None and tp.size > 1:
            raise ConfigError("--tensor-parallel-size: only the native runner splits a model "
                              "over ranks so far")
        from engine.worker.vllm.checks import VllmVersionError, check_vllm_version

        try:
            check_vllm_version()  # before importing anything of vLLM's: a clear message
        except VllmVersionError as e:
            raise ConfigError(f"--runner: {e}") from e
        from engine.worker.vllm.runner import VllmRunner

        return VllmRunner(model_config, cache_config, worker_config, device=device,
                          **vllm_limits(scheduler_config))
    raise ConfigError(f"--runner: must be one of {RUNNERS}, got {runner!r}")


def vllm_limits(scheduler_config: SchedulerConfig) -> dict[str, int]:
    """The scheduler's per-step limits as the vllm runner's keyword arguments."""
    return {"max_num_batched_tokens": scheduler_config.max_num_batched_tokens,
            "max_num_seqs": scheduler_config.max_num_seqs}
