"""Tensor parallelism (Megatron layout) for the native Llama-family model.

A model is split over the ``size`` ranks of a ``torch.distributed`` group, each rank holding
one contiguous block of the attention heads and of the MLP's intermediate features:

- ``qkv_proj`` and ``gate_up_proj`` are column-parallel: a rank holds the output rows of its
  query heads, KV heads, gate and up features (so its KV cache holds only its KV heads);
- ``o_proj`` and ``down_proj`` are row-parallel: a rank holds the input columns of its heads /
  features and produces a partial sum of the full output, summed over the group by one
  all-reduce per block (two per layer); their biases are added once, after the sum;
- norms, embeddings and the LM head are replicated: every rank computes the same full logits.

With contiguous head blocks the GQA mapping stays local: global query head
``r * H/T + j`` reads KV head ``(r * H/T + j) // (H/Hkv) = r * Hkv/T + j // (H/Hkv)``, i.e.
local KV head ``j // (H/Hkv)`` of the same rank, which is what the attention kernels compute
from the per-rank head counts (their ratio is unchanged).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from engine.models import cpu_linear

if TYPE_CHECKING:
    from engine.models.llama import LlamaConfig

#: A tensor-parallel group's other ranks wait in a collective for their leader's next step
#: however long the engine stays idle.
TP_TIMEOUT = timedelta(days=365)


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group.

    group: the ``torch.distributed`` process group of the ``size`` ranks; None only when
    ``size == 1`` (a None group with ``size > 1`` would mean the default group).
    """

    rank: int
    size: int
    group: Any = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(
                f"tensor parallel rank {self.rank} of size {self.size}: need size >= 1 and "
                f"0 <= rank < size"
            )

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group in place (a no-op when ``size == 1``); returns ``x``."""
        if self.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def block(self, total: int) -> tuple[int, int]:
        """This rank's contiguous ``[start, end)`` of ``total`` items split evenly."""
        if total % self.size:
            raise ValueError(f"{total} items do not split over {self.size} ranks")
        n = total // self.size
        return self.rank * n, (self.rank + 1) * n


def init_world(device: str | None, tp_size: int, *, init_method: str | None = None,
               rank: int | None = None, world_size: int | None = None) -> None:
    """Join this process's ``torch.distributed`` world: the one ``init_process_group`` of the
    engine (a launcher's tensor-parallel group meets through ``init_method``, a file in its
    run directory; torchrun's ranks through torchrun's environment, ``init_method`` None).
    CPU tensors (addresses, each step's batch) go over gloo; with a CUDA ``device`` and
    ``tp_size > 1`` the all-reduces go over NCCL, on ``device`` made current."""
    nccl = device is not None and device.startswith("cuda") and tp_size > 1
    if nccl:
        torch.cuda.set_device(device)  # NCCL works on the current device
    kwargs: dict[str, Any] = {} if init_method is None else {
        "init_method": init_method, "rank": rank, "world_size": world_size}
    dist.init_process_group("cpu:gloo,cuda:nccl" if nccl else "gloo", timeout=TP_TIMEOUT,
                            **kwargs)


def is_sharded(tp: TensorParallel | None) -> bool:
    return tp is not None and tp.size > 1


def shard_config(cfg: LlamaConfig, tp: TensorParallel | None) -> LlamaConfig:
    """The per-rank config: ``num_heads``, ``num_kv_heads`` and ``intermediate_size`` divided
    by ``tp.size`` (``head_dim``, ``hidden_size`` and the vocabulary unchanged). ``cfg`` itself
    when unsharded. Raises ValueError naming --tensor-parallel-size when they do not divide."""
    if not is_sharded(tp):
        return cfg
    assert tp is not None
    t = tp.size
    bad = [
        f"{what} ({n})"
        for what, n in (
            ("num_attention_heads", cfg.num_heads),
            ("num_key_value_heads", cfg.num_kv_heads),
            ("intermediate_size", cfg.intermediate_size),
        )
        if n % t
    ]
    if bad:
        raise ValueError(
            f"--tensor-parallel-size {t} does not divide the {cfg.architecture} model's "
            f"{' and '.join(bad)}; choose a tensor parallel size that divides "
            f"num_attention_heads={cfg.num_heads}, num_key_value_heads={cfg.num_kv_heads} "
            f"and intermediate_size={cfg.intermediate_size}"
        )
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // t,
        num_kv_heads=cfg.num_kv_heads // t,
        intermediate_size=cfg.intermediate_size // t,
    )


def row_parallel_linear(
    linear: nn.Linear, x: torch.Tensor, tp: TensorParallel | None
) -> torch.Tensor:
    """``linear(x)`` for a row-parallel layer: ``x`` holds this rank's input features and
    ``linear.weight`` the matching input columns; the partial products are summed over the
    group and the (replicated) bias added once, after the sum. Unsharded: ``linear(x)``."""
    if tp is None or tp.size == 1:
        out: torch.Tensor = linear(x)
        return out
    out = tp.all_reduce(cpu_linear.linear(x, linear.weight))
    return out if linear.bias is None else out + linear.bias
