"""``torchrun ... -m engine.torchrun [engine flags]``: one engine across GPUs and nodes.

Every torchrun rank is one worker of the pool (on ``cuda:LOCAL_RANK``, or the CPU without
a GPU). Rank 0 is also the launcher: it starts the pool's scheduler, its own worker and the
frontend exactly as ``python -m engine.launch`` does, except that the pool's worker socket and
the launcher's inbox also listen on TCP. The other ranks learn those two addresses from rank
0 through torchrun's rendezvous (a gloo process group, used for that one broadcast and then
closed), load the model, dial the pool, and serve step plans until the pool tells them to
stop. The scheduler sees ``WORLD_SIZE`` workers, places requests across all of them and owns
every worker's block table, as on one machine.

    torchrun --standalone --nproc-per-node 8 -m engine.torchrun --model /models/llama
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m engine.torchrun --model /models/llama --host 0.0.0.0

(``launch/torchrun.sh`` wraps these.) Details and decisions: docs/architecture.md, "torchrun".

- ``--workers`` is the world size (giving another number is an error); one ``--model`` per
  launch. Each rank is a data-parallel worker: tensor parallelism inside a group of ranks is
  not built yet.
- Rank 0's address, as the other ranks dial it: ``ENGINE_ADVERTISE_HOST`` if set, else
  ``MASTER_ADDR`` (which torchrun sets to rank 0's host).
- Lifecycle follows torchrun's: the ranks live and die together. Ctrl-C or SIGTERM stops
  rank 0's engine, its pool tells every worker to stop, and every rank exits 0. A rank that
  dies makes torchrun stop the rest (or restart all of them, with ``--max-restarts``); the
  launcher restarts only the worker it started itself.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from engine.config import ConfigError, EngineConfig, config_from_args, replace
from engine.models.info import load_model_info
from engine.scheduler.policy import get_policy

log = logging.getLogger("engine.torchrun")

PROG = "python -m engine.torchrun"


def rank_env() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from torchrun's environment."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        raise ConfigError("run under torchrun (RANK and WORLD_SIZE are not set); on one "
                          "machine, python -m engine.launch starts every process itself")
    world = int(env["WORLD_SIZE"])
    return (int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0")),
            int(env.get("LOCAL_WORLD_SIZE", str(world))))


def torchrun_config(argv: Sequence[str] | None, world_size: int,
                    local_world_size: int) -> EngineConfig:
    """The engine's flags, checked, with the workers set to the world size and rank 0's
    sockets listening on TCP."""
    cfg = config_from_args(argv)
    if len(cfg.models) != 1:
        raise ConfigError(f"--model: torchrun serves one model per launch, got {len(cfg.models)}")
    if cfg.worker.num_workers not in (1, world_size):
        raise ConfigError(f"--workers: under torchrun every rank is a worker, so --workers is "
                          f"the world size ({world_size}), got {cfg.worker.num_workers}")
    load_model_info(cfg.models[0])
    get_policy(cfg.scheduler.policy)
    threads = cfg.worker.num_threads or max(1, (os.cpu_count() or 1) // local_world_size)
    return replace(cfg, worker={"num_workers": world_size, "num_threads": threads},
                   launch={"listen_host": "0.0.0.0", "num_local_workers": 1})


def main(argv: Sequence[str] | None = None) -> int:
    try:
        rank, world, local_rank, local_world = rank_env()
        cfg = torchrun_config(argv, world, local_world)
    except (ConfigError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.launch.log_level, stream=sys.stderr,
                        format=f"%(asctime)s rank {rank} %(levelname)s: %(message)s")
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", timeout=timedelta(seconds=cfg.launch.ready_timeout_s + 60))
    if rank == 0:
        return _run_rank0(cfg, dist)
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)  # waits until rank 0's pool listens
    dist.destroy_process_group()
    addresses: dict[str, str] = box[0]
    log.info("dialing the pool at %s", addresses["pool"])
    import torch

    from engine.worker.process import serve_worker

    device = None
    if cfg.worker.device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    serve_worker(cfg, 0, rank, 0, pool_address=addresses["pool"],
                 launcher=addresses["launcher"], device=device)
    return 0


def _run_rank0(cfg: EngineConfig, dist: Any) -> int:
    from engine.launch import Launcher

    host = os.environ.get("ENGINE_ADVERTISE_HOST") or os.environ.get("MASTER_ADDR", "127.0.0.1")

    def publish(ports: dict[str, Any]) -> None:
        addresses = {"launcher": f"tcp://{host}:{ports['launcher_port']}",
                     "pool": f"tcp://{host}:{ports['worker_ports'][0]}"}
        log.info("pool listening for workers at %s", addresses["pool"])
        dist.broadcast_object_list([addresses], src=0)
        dist.destroy_process_group()

    return Launcher(cfg, publish=publish).run()


if __name__ == "__main__":
    sys.exit(main())
