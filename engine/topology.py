"""The engine's process shape, decided before anything starts: which pools, which workers
(with which device and tensor-parallel rank), which processes this machine starts, and
where they meet. Both entry points build one: ``python -m engine.launch``
(``Topology.local``: every worker here) and ``engine.torchrun`` (``Topology.torchrun``: the
control plane on rank 0, every worker on its own rank, dialing in over TCP).

Addresses: ``ipc://`` sockets in ``run_dir`` (``engine.ipc.pool_addresses``); with
``listen_host`` set, each pool's worker socket and the launcher's inbox also listen on TCP,
as CURVE servers with the launch's keys (``curve``, made by torchrun's rank 0; engine.ipc).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.ipc import CurveKeys


def worker_name(pool_index: int, worker_id: int, tp_rank: int = 0) -> str:
    return f"worker-{pool_index}-{worker_id}" + (f"-tp{tp_rank}" if tp_rank else "")


@dataclass(frozen=True)
class WorkerSlot:
    """One worker process: rank ``tp_rank`` of worker ``worker_id`` of pool ``pool_index``,
    on ``device`` (``cuda:N``; None: the config's device, i.e. the CPU)."""

    pool_index: int
    worker_id: int
    tp_rank: int = 0
    device: str | None = None

    @property
    def name(self) -> str:
        return worker_name(self.pool_index, self.worker_id, self.tp_rank)

    @property
    def group(self) -> str:
        """Its tensor-parallel group: restarted as one."""
        return worker_name(self.pool_index, self.worker_id)


@dataclass(frozen=True)
class Topology:
    num_pools: int
    workers_per_pool: int
    tp_size: int
    #: Worker processes this launcher starts and supervises.
    local_workers: tuple[WorkerSlot, ...]
    #: Workers started elsewhere (other torchrun ranks) that dial in: ready when they say
    #: so, not supervised here.
    remote_workers: tuple[str, ...] = ()
    #: Also listen on TCP at this address (torchrun: for the other ranks' workers).
    listen_host: str | None = None
    #: The launch's CURVE keys, server secret included: every TCP listener is CURVE.
    curve: CurveKeys | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.listen_host is not None and (self.curve is None or not self.curve.server_secret):
            raise ValueError("a Topology that listens on TCP needs the launch's CURVE keys")

    @property
    def pools(self) -> range:
        return range(self.num_pools)

    @classmethod
    def local(cls, cfg: EngineConfig, num_gpus: int | None = None) -> Topology:
        """Every worker of every pool on this machine; GPUs round robin over the worker
        processes (tensor-parallel ranks included) when the device is CUDA."""
        w = cfg.worker
        if num_gpus is None:
            num_gpus = gpu_count() if w.device == "cuda" else 0
        slots = []
        for p in range(len(cfg.models)):
            for worker in range(w.num_workers):
                for rank in range(w.tensor_parallel_size):
                    index = (p * w.num_workers + worker) * w.tensor_parallel_size + rank
                    device = f"cuda:{index % num_gpus}" if num_gpus else None
                    slots.append(WorkerSlot(p, worker, rank, device))
        return cls(len(cfg.models), w.num_workers, w.tensor_parallel_size, tuple(slots))

    @classmethod
    def torchrun(cls, cfg: EngineConfig, curve: CurveKeys) -> Topology:
        """The control plane's view under torchrun: every worker is remote, dialing in over
        TCP with ``curve`` (rank 0's keys for this launch)."""
        names = tuple(worker_name(p, w) for p in range(len(cfg.models))
                      for w in range(cfg.worker.num_workers))
        return cls(len(cfg.models), cfg.worker.num_workers, cfg.worker.tensor_parallel_size,
                   (), names, listen_host="0.0.0.0", curve=curve)

    @staticmethod
    def rank_slot(cfg: EngineConfig, rank: int, world_size: int,
                  local_rank: int) -> WorkerSlot:
        """The worker a torchrun rank runs: ranks split evenly over the models, in order;
        groups of ``tp`` consecutive ranks form one worker; ``cuda:LOCAL_RANK`` on CUDA."""
        size = cfg.worker.tensor_parallel_size
        per_pool = world_size // len(cfg.models)
        device = f"cuda:{local_rank}" if cfg.worker.device == "cuda" else None
        return WorkerSlot(rank // per_pool, rank % per_pool // size, rank % size, device)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
