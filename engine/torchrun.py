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
  ``MASTER_ADDR`` (which torchrun sets to rank 0's host); ``engine.env`` reads both.
- The placement is ``engine.topology``'s: ``Topology.torchrun`` for the control plane (every
  worker remote, sockets also on TCP), ``Topology.rank_slot`` for each rank's worker.
- Ctrl-C or SIGTERM stops the control plane, its pool tells every worker to stop, each
  leader tells its group, and every rank exits.
- A pool that dies stops the engine here (``python -m engine.launch`` restarts it): its
  worker socket's TCP port was published once, and a restarted pool would bind another.
- Without tensor parallelism a rank runs its worker in a child that it restarts if it dies
  (``engine.supervisor``, the launcher's restart policy; telling the launcher, so the pool
  recomputes the worker's requests): no request is lost.
- The TCP sockets between ranks are ZeroMQ CURVE: rank 0 makes this launch's keys
  (``engine.ipc.CurveKeys``) and broadcasts them with the addresses, over torchrun's process
  group; the pool and the launcher admit only holders of the client key. Without CURVE in
  libzmq every rank refuses to start.
  A tensor-parallel rank runs its shard in its own process, and its group follows
  torchrun's gang semantics (one dies, torchrun stops or restarts them all).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine import env, ipc
from engine.cli import config_from_args
from engine.config import ConfigError, EngineConfig, replace
from engine.resolve import resolve_config
from engine.supervisor import Child, ProcessSpec, Supervisor, SupervisorError
from engine.topology import Topology, WorkerSlot

log = logging.getLogger("engine.torchrun")

PROG = "python -m engine.torchrun"
#: After the control plane ends cleanly, how long rank 0 waits for the pool's stop message
#: before stopping its own worker anyway.
STOP_GRACE_S = 10.0
#: How long the control plane gets to shut its children down on SIGTERM.
CONTROL_STOP_S = 30.0


def rank_env() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from torchrun's environment."""
    ranks = env.torchrun_ranks()
    if ranks is None:
        raise ConfigError("run under torchrun (RANK and WORLD_SIZE are not set); on one "
                          "machine, python -m engine.launch starts every process itself")
    return ranks.rank, ranks.world_size, ranks.local_rank, ranks.local_world_size


def torchrun_config(argv: Sequence[str] | None, world_size: int,
                    local_world_size: int) -> EngineConfig:
    """The engine's flags, checked and resolved, with the workers set from the world size."""
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
    cfg = resolve_config(replace(cfg, worker={"num_workers": workers}))
    threads = cfg.worker.num_threads or max(1, (os.cpu_count() or 1) // local_world_size)
    return replace(cfg, worker={"num_threads": threads})


def main(argv: Sequence[str] | None = None) -> int:
    try:
        rank, world, local_rank, local_world = rank_env()
        cfg = torchrun_config(argv, world, local_world)
        ipc.require_curve()
    except (ConfigError, ValueError, ipc.CurveError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.launch.log_level, stream=sys.stderr,
                        format=f"%(asctime)s rank {rank} %(levelname)s: %(message)s")
    import torch.distributed as dist

    from engine.models.parallel import TensorParallel, init_world

    slot = Topology.rank_slot(cfg, rank, world, local_rank)
    size = cfg.worker.tensor_parallel_size
    init_world(slot.device, size)
    tp = None
    if size > 1:
        for first in range(0, world, size):  # every rank creates every group, in order
            group = dist.new_group(list(range(first, first + size)))
            if first <= rank < first + size:
                tp = TensorParallel(rank=rank - first, size=size, group=group)

    control: Supervisor | None = None
    box: list[Any] = [None]
    if rank == 0:
        control, box[0] = _start_control_plane(cfg, ipc.CurveKeys.generate())
    # The others wait here until the pool listens. The keys go with the addresses: over the
    # process group's connections, once, not into torchrun's store (which any peer that
    # reaches its port can read for the whole run).
    dist.broadcast_object_list(box, src=0)
    addresses: dict[str, Any] | None = box[0]
    if addresses is None:  # the control plane failed to start (it said why)
        return (_exit_code(control) or 1) if rank == 0 else 1
    if size == 1:
        dist.destroy_process_group()
        return _supervise_rank(cfg, slot, addresses, control)
    # A tensor-parallel rank runs its shard in this process: the group is torchrun's gang.
    if control is not None:
        _watch(control)
    from engine.process import init_process
    from engine.worker.process import serve_worker

    init_process(f"engine-{slot.name}", cfg.launch.log_level)
    try:
        serve_worker(cfg, slot.pool_index, slot.worker_id, 0,
                     pool_address=addresses["pools"][slot.pool_index],
                     launcher=addresses["launcher"], device=slot.device, tp=tp,
                     curve=addresses["curve"])
    finally:
        if control is not None:
            control.shutdown(grace_s=CONTROL_STOP_S)
    return _exit_code(control)


# --------------------------------------------------------------------------- a worker rank


def _supervise_rank(cfg: EngineConfig, slot: WorkerSlot, addresses: dict[str, Any],
                    control: Supervisor | None) -> int:
    """A data-parallel rank: its worker runs in a child that the launcher's supervisor
    restarts when it dies, under the same policy. The launcher hears of each death
    (``WorkerDied``, over TCP) and has the pool recompute the worker's requests elsewhere,
    so a dead worker loses no request here either. Returns when the pool stops the worker
    (exit 0), on SIGTERM, or when the control plane (rank 0) ends."""
    from engine import messages as m
    from engine.launch import restart_policy
    from engine.process import die_with_parent

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the control plane
    die_with_parent()

    def died(child: Child, incarnation: int) -> None:
        ipc.notify_launcher(addresses["launcher"], m.WorkerDied(
            worker_id=slot.worker_id, incarnation=child.incarnation, pool_index=slot.pool_index),
            addresses["curve"])

    workers = Supervisor(restart_policy(cfg), on_restart=died)
    workers.spawn(ProcessSpec(slot.name, "engine.torchrun:rank_worker", (cfg, slot, addresses),
                              restart=True, done_on_clean_exit=True, pass_incarnation=True))
    code = 0
    try:
        while not stopping.is_set() and not workers.done and _running(control):
            workers.check()
            time.sleep(0.2)
    except SupervisorError as e:
        log.error("%s", e)
        code = 1
    if control is not None and _exit_code(control) == 0 and not stopping.is_set():
        deadline = time.monotonic() + STOP_GRACE_S  # the pool's stop message is on its way
        while time.monotonic() < deadline and any(
                c.exitcode is None for c in workers.children.values()):
            time.sleep(0.2)
    workers.shutdown()
    if control is not None:
        control.shutdown(grace_s=CONTROL_STOP_S)
        code = code or _exit_code(control)
    return code


def rank_worker(cfg: EngineConfig, slot: WorkerSlot, addresses: dict[str, Any], *,
                incarnation: int = 0) -> None:
    """Entry point of a data-parallel rank's worker process."""
    from engine.process import init_process
    from engine.worker.process import lower_priority, serve_worker

    init_process(f"engine-{slot.name}", cfg.launch.log_level)
    lower_priority(cfg)
    serve_worker(cfg, slot.pool_index, slot.worker_id, incarnation,
                 pool_address=addresses["pools"][slot.pool_index],
                 launcher=addresses["launcher"], device=slot.device, curve=addresses["curve"])


# --------------------------------------------------------------------------- rank 0


def _start_control_plane(cfg: EngineConfig, curve: ipc.CurveKeys
                         ) -> tuple[Supervisor, dict[str, Any] | None]:
    """Start launcher, pool and frontend in a child (``curve``: this launch's keys, handed
    over on its stdin); return its supervisor and what workers need to dial in (addresses
    and the client's keys), or None if it stopped before its pool listened."""
    host = env.advertise_host()
    scratch = Path(tempfile.mkdtemp(prefix="engine-rank0-"))
    ports_file = scratch / "ports.json"
    control = Supervisor()
    child = control.spawn(ProcessSpec("launcher", "engine.torchrun:control_plane",
                                      (cfg, str(ports_file), curve)))
    deadline = time.monotonic() + cfg.launch.ready_timeout_s
    try:
        while child.exitcode is None and time.monotonic() < deadline:
            if ports_file.exists():
                ports = json.loads(ports_file.read_text())
                addresses: dict[str, Any] = {
                    "launcher": f"tcp://{host}:{ports['launcher_port']}",
                    "pools": [f"tcp://{host}:{p}" for p in ports["worker_ports"]],
                    "curve": curve.for_peers()}
                log.info("pools listening for workers at %s", ", ".join(addresses["pools"]))
                return control, addresses
            time.sleep(0.1)
        if child.exitcode is None:
            log.error("the control plane did not start within --ready-timeout")
            control.shutdown(grace_s=CONTROL_STOP_S)
        return control, None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def control_plane(cfg: EngineConfig, ports_file: str, curve: ipc.CurveKeys) -> int:
    """Child of rank 0: ``python -m engine.launch`` without workers of its own; the pools'
    TCP ports go to ``ports_file`` for rank 0 to hand to the other ranks."""
    from engine.launch import Launcher

    def publish(ports: dict[str, Any]) -> None:
        tmp = f"{ports_file}.tmp"
        Path(tmp).write_text(json.dumps(ports))
        os.replace(tmp, ports_file)

    logging.basicConfig(level=cfg.launch.log_level, stream=sys.stderr,
                        format="%(asctime)s launcher %(levelname)s: %(message)s")
    return Launcher(cfg, Topology.torchrun(cfg, curve), publish=publish).run()


def _running(control: Supervisor | None) -> bool:
    return control is None or control.exit_code("launcher") is None


def _watch(control: Supervisor) -> None:
    """Stop this rank's worker when the control plane ends: at once if it failed, after a
    grace period (the pool's stop message normally comes first) if it ended cleanly."""
    def wait() -> None:
        code = control.children["launcher"].proc.wait()
        if code:
            log.error("the control plane exited with code %s", code)
            os._exit(code if code > 0 else 1)
        time.sleep(STOP_GRACE_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="control-plane-watch", daemon=True).start()


def _exit_code(control: Supervisor | None) -> int:
    code = control.exit_code("launcher") if control is not None else None
    return 0 if code is None else (code if code >= 0 else 1)


if __name__ == "__main__":
    sys.exit(main())
