"""``torchrun ... -m engine.torchrun [engine flags]``: one engine across GPUs and nodes.

Every torchrun rank runs one model shard on ``cuda:LOCAL_RANK`` (the CPU without a GPU).
Ranks form tensor-parallel groups of ``--tensor-parallel-size`` consecutive ranks (default
1); each group is one worker of the pool, led by its first rank, so the pool has
``WORLD_SIZE / tp`` data-parallel workers. Rank 0 also starts the engine's control plane
in a child process: the launcher, the pool's scheduler and the frontend, as ``python -m
engine.launch`` would, with the pool's worker socket and the launcher's inbox also listening
on TCP. The other ranks learn those addresses through torchrun's rendezvous (one broadcast
over the process group), each group leader dials the pool like any worker, and the other
ranks of a group run the forward passes their leader sends them. The scheduler sees
ordinary workers: it places requests across all of them and owns every block table.

    torchrun --standalone --nproc-per-node 8 -m engine.torchrun --model /models/llama
    torchrun --standalone --nproc-per-node 8 -m engine.torchrun --model ... -tp 2
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m engine.torchrun --model /models/llama --host 0.0.0.0

(``launch/torchrun.sh`` wraps these.) Decisions: docs/architecture.md, "torchrun".

- With several ``--model``s the ranks are split evenly between them, in order: model ``p``
  (pool ``p``) gets ranks ``p * W/M`` to ``(p + 1) * W/M - 1``. ``--workers`` is therefore
  ``WORLD_SIZE / (models x --tensor-parallel-size)`` per pool (giving another number is an
  error).
- Rank 0's address, as the other ranks dial it: ``ENGINE_ADVERTISE_HOST`` if set, else
  ``MASTER_ADDR`` (which torchrun sets to rank 0's host).
- Ctrl-C or SIGTERM stops the control plane, its pool tells every worker to stop, each
  leader tells its group, and every rank exits.
- Without tensor parallelism a rank runs its worker in a child that it restarts if it dies
  (telling the launcher, so the pool recomputes the worker's requests): no request is lost.
  A tensor-parallel rank runs its shard in its own process, and its group follows
  torchrun's gang semantics (one dies, torchrun stops or restarts them all).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from engine.config import ConfigError, EngineConfig, config_from_args, replace
from engine.launch import preflight
from engine.worker.process import TP_TIMEOUT

log = logging.getLogger("engine.torchrun")

PROG = "python -m engine.torchrun"
#: After the control plane ends cleanly, how long rank 0 waits for the pool's stop message
#: before stopping its own worker anyway.
STOP_GRACE_S = 10.0


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
    """The engine's flags, checked, with the workers set from the world size and the
    control plane's sockets listening on TCP for every worker."""
    cfg = config_from_args(argv)
    tp = cfg.worker.tensor_parallel_size
    pools = len(cfg.models)
    if world_size % (pools * tp):
        what = f"{pools} models x " if pools > 1 else ""
        raise ConfigError(f"--tensor-parallel-size: the world size ({world_size}) must be a "
                          f"multiple of {what}it, got {tp}")
    workers = world_size // (pools * tp)
    if cfg.worker.num_workers not in (1, workers):
        raise ConfigError(f"--workers: under torchrun it is the world size over "
                          f"--tensor-parallel-size and the models ({workers}), got "
                          f"{cfg.worker.num_workers}")
    cfg = preflight(cfg)
    threads = cfg.worker.num_threads or max(1, (os.cpu_count() or 1) // local_world_size)
    return replace(cfg, worker={"num_workers": workers, "num_threads": threads},
                   launch={"listen_host": "0.0.0.0", "num_local_workers": 0})


def main(argv: Sequence[str] | None = None) -> int:
    try:
        rank, world, local_rank, local_world = rank_env()
        cfg = torchrun_config(argv, world, local_world)
    except (ConfigError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.launch.log_level, stream=sys.stderr,
                        format=f"%(asctime)s rank {rank} %(levelname)s: %(message)s")
    import torch
    import torch.distributed as dist

    from engine.models.parallel import TensorParallel

    use_cuda = cfg.worker.device in ("auto", "cuda") and torch.cuda.is_available()
    device = f"cuda:{local_rank}" if use_cuda else None
    size = cfg.worker.tensor_parallel_size
    per_pool = world // len(cfg.models)  # ranks per model: pool p holds ranks p*per_pool..
    pool_index, worker_id = rank // per_pool, rank % per_pool // size
    if use_cuda and size > 1:
        torch.cuda.set_device(local_rank)
    # CPU tensors (addresses, each step's batch) go over gloo; GPU all-reduces over NCCL.
    dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda and size > 1 else "gloo",
                            timeout=TP_TIMEOUT)
    tp = None
    if size > 1:
        for first in range(0, world, size):  # every rank creates every group, in order
            group = dist.new_group(list(range(first, first + size)))
            if first <= rank < first + size:
                tp = TensorParallel(rank=rank - first, size=size, group=group)

    control: BaseProcess | None = None
    box: list[Any] = [None]
    if rank == 0:
        control, box[0] = _start_control_plane(cfg)
    dist.broadcast_object_list(box, src=0)  # the others wait here until the pool listens
    addresses: dict[str, Any] | None = box[0]
    if addresses is None:  # the control plane failed to start (it said why)
        return (_exit_code(control) or 1) if rank == 0 else 1
    if size == 1:
        dist.destroy_process_group()
        return _supervise_rank(cfg, pool_index, worker_id, device, addresses, control)
    # A tensor-parallel rank runs its shard in this process: the group is torchrun's gang.
    if control is not None:
        _watch(control)
    from engine.process import init_process
    from engine.worker.process import serve_worker, worker_name

    init_process(f"engine-{worker_name(pool_index, worker_id, rank % size)}",
                 cfg.launch.log_level)
    try:
        serve_worker(cfg, pool_index, worker_id, 0, pool_address=addresses["pools"][pool_index],
                     launcher=addresses["launcher"], device=device, tp=tp)
    finally:
        if control is not None:
            _stop(control)
    return _exit_code(control) if control is not None else 0


# --------------------------------------------------------------------------- a worker rank


def _supervise_rank(cfg: EngineConfig, pool_index: int, worker_id: int, device: str | None,
                    addresses: dict[str, Any], control: BaseProcess | None) -> int:
    """A data-parallel rank: its worker runs in a child that this process restarts when it
    dies, as the launcher restarts the workers it starts. The launcher hears of each death
    (``WorkerDied``, over TCP) and has the pool recompute the worker's requests elsewhere,
    so a dead worker loses no request here either. Returns when the pool stops the worker
    (exit 0), on SIGTERM, or when the control plane (rank 0) ends."""
    from engine import ipc
    from engine import messages as m
    from engine.process import die_with_parent

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the control plane
    die_with_parent()
    ctx = mp.get_context("spawn")
    incarnation = restarts = 0
    code = 0
    while True:
        child = ctx.Process(target=_rank_worker, name=f"worker-{pool_index}-{worker_id}",
                            args=(cfg, pool_index, worker_id, incarnation, addresses, device))
        child.start()
        while child.exitcode is None and not stopping.is_set() and (
                control is None or control.exitcode is None):
            child.join(0.2)
        if child.exitcode is None:  # stopping, or the control plane ended
            if control is not None and control.exitcode == 0:
                child.join(STOP_GRACE_S)  # the pool's stop message is on its way
            _stop(child)
            break
        if child.exitcode == 0:  # the pool said stop
            break
        restarts += 1
        if restarts > cfg.launch.max_worker_restarts:
            log.error("worker %d exited with code %s; restart limit (%d) reached", worker_id,
                      child.exitcode, cfg.launch.max_worker_restarts)
            code = 1
            break
        log.warning("worker %d exited with code %s; restarting it", worker_id, child.exitcode)
        ipc.notify_launcher(addresses["launcher"], m.WorkerDied(
            worker_id=worker_id, incarnation=incarnation, pool_index=pool_index))
        incarnation += 1
    if control is not None:
        _stop(control)
        code = code or _exit_code(control)
    return code


def _rank_worker(cfg: EngineConfig, pool_index: int, worker_id: int, incarnation: int,
                 addresses: dict[str, Any], device: str | None) -> None:
    from engine.process import init_process
    from engine.worker.process import serve_worker, worker_name

    init_process(f"engine-{worker_name(pool_index, worker_id)}", cfg.launch.log_level)
    serve_worker(cfg, pool_index, worker_id, incarnation,
                 pool_address=addresses["pools"][pool_index], launcher=addresses["launcher"],
                 device=device)


# --------------------------------------------------------------------------- rank 0


def _start_control_plane(cfg: EngineConfig) -> tuple[BaseProcess, dict[str, Any] | None]:
    """Start launcher, pool and frontend in a child; return it and the addresses workers
    dial, or None if it stopped before its pool listened."""
    host = os.environ.get("ENGINE_ADVERTISE_HOST") or os.environ.get("MASTER_ADDR", "127.0.0.1")
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_control_plane, args=(cfg, send), name="engine-launcher")
    proc.start()
    send.close()
    deadline = time.monotonic() + cfg.launch.ready_timeout_s
    while proc.is_alive() and time.monotonic() < deadline:
        if receive.poll(0.2):
            ports = receive.recv()
            addresses = {"launcher": f"tcp://{host}:{ports['launcher_port']}",
                         "pools": [f"tcp://{host}:{p}" for p in ports["worker_ports"]]}
            log.info("pools listening for workers at %s", ", ".join(addresses["pools"]))
            return proc, addresses
    if proc.is_alive():
        log.error("the control plane did not start within --ready-timeout")
        _stop(proc)
    return proc, None


def _control_plane(cfg: EngineConfig, send: Connection) -> None:
    """Child of rank 0: ``python -m engine.launch`` without workers of its own."""
    from engine.launch import Launcher
    from engine.process import die_with_parent

    die_with_parent()
    logging.basicConfig(level=cfg.launch.log_level, stream=sys.stderr,
                        format="%(asctime)s launcher %(levelname)s: %(message)s")
    sys.exit(Launcher(cfg, publish=send.send).run())


def _watch(control: BaseProcess) -> None:
    """Stop this rank's worker when the control plane ends: at once if it failed, after a
    grace period (the pool's stop message normally comes first) if it ended cleanly."""
    def wait() -> None:
        control.join()
        if control.exitcode:
            log.error("the control plane exited with code %s", control.exitcode)
            os._exit(control.exitcode if control.exitcode > 0 else 1)
        time.sleep(STOP_GRACE_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="control-plane-watch", daemon=True).start()


def _stop(control: BaseProcess) -> None:
    if control.exitcode is None:
        control.terminate()  # SIGTERM: the launcher shuts its children down
    control.join(30)
    if control.exitcode is None:
        control.kill()
        control.join()


def _exit_code(control: BaseProcess | None) -> int:
    code = control.exitcode if control is not None else 0
    return 0 if code is None else (code if code >= 0 else 1)


if __name__ == "__main__":
    sys.exit(main())
