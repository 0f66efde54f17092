"""Every environment variable the engine reads, in one module.

Flags configure the engine; the environment only says where it runs (torchrun's variables,
the advertised host), where files go, and two opt-ins for development. Nothing else under
``engine/`` reads ``os.environ`` (the vLLM runner *sets* vLLM's own defaults there).

    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE   set by torchrun (``torchrun_ranks``)
    ENGINE_ADVERTISE_HOST, MASTER_ADDR               rank 0's address as other ranks dial it
    ENGINE_CACHE_DIR                                 where the default model is unpacked
    ENGINE_VLLM_ATTENTION                            ``engine``: our kernels inside vLLM
    ENGINE_API_KEY                                   the CLI client's default ``--api-key``
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class TorchrunRanks:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def torchrun_ranks() -> TorchrunRanks | None:
    """torchrun's placement of this process, or None outside torchrun."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    world = int(env["WORLD_SIZE"])
    return TorchrunRanks(int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0")),
                         int(env.get("LOCAL_WORLD_SIZE", str(world))))


def advertise_host() -> str:
    """Rank 0's address as the other ranks dial it."""
    return (os.environ.get("ENGINE_ADVERTISE_HOST") or os.environ.get("MASTER_ADDR")
            or "127.0.0.1")


def cache_dir() -> str | None:
    return os.environ.get("ENGINE_CACHE_DIR") or None


def vllm_attention() -> str:
    """``ENGINE_VLLM_ATTENTION``, stripped and lower-cased ("" when unset)."""
    return os.environ.get("ENGINE_VLLM_ATTENTION", "").strip().lower()


def client_api_key() -> str | None:
    return os.environ.get("ENGINE_API_KEY")
