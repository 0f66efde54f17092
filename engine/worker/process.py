"""The worker process: receive a StepPlan, run it on the model runner, send the StepResult.

It says hello (``WorkerReady``, its KV capacity) once its model is loaded, and then answers
plans. A step that raises is reported as ``WorkerError`` (the pool fails that step's
requests); the worker itself goes on. A plan addressed to another incarnation is dropped
unread: the pool sent it to this worker's dead predecessor before it heard of the death, and
the predecessor's address (its ZMQ identity) is now this process's (engine/pool/service.py).
Results and errors carry the incarnation.

Pool restart. The worker outlives its pool: when the pool process dies, the worker's DEALER
reconnects to the same address on its own, and the launcher's new pool binds it again. Each
pool incarnation greets each worker (``PoolHello``) before its first plan to it. The
worker's socket is one ordered stream across the reconnect (ZeroMQ keeps a connecting
socket's queues), so what comes before a hello is the old pool's and what comes after it the
new one's. A hello from a pool incarnation the worker does not know therefore means: every
request held so far belonged to a pool that is gone. The worker drops them all
(``ModelRunner.drop``: their state and grammar matchers; their KV blocks are overwritten
later) and says ``WorkerReady`` again, with the same incarnation (a fresh pool accepts any;
one that registered the worker already ignores the repeat). Its answers to plans of the dead
pool reach the new pool before that ``WorkerReady`` and are dropped there as stale.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import zmq

from engine import ipc
from engine import messages as m
from engine.config import EngineConfig
from engine.topology import WorkerSlot, worker_name
from engine.worker.runner import GroupError, ModelRunner

__all__ = ["run_worker", "serve", "serve_worker", "worker_name"]

if TYPE_CHECKING:
    from engine.models.parallel import TensorParallel

log = logging.getLogger(__name__)

def serve(runner: ModelRunner, sock: zmq.Socket[Any], worker_id: int,
          incarnation: int = 0, pid: int = 0) -> None:
    """Say ``WorkerReady`` on ``sock`` (a DEALER dialing the pool), then answer the pool's
    messages until it says ``Shutdown``; see the module doc for a pool's restart. ``pid``:
    this process's, when the pool may pause it (``WorkerReady.pid``)."""
    ready = ipc.encode(m.WorkerReady(worker_id=worker_id, num_blocks=runner.num_blocks,
                                     block_size=runner.block_size, incarnation=incarnation,
                                     pid=pid))
    sock.send(ready)
    pool: int | None = None  # the pool incarnation that greeted this worker last
    held: set[str] = set()  # every request the runner may hold (a superset: a failed step's)
    while True:
        msg = ipc.POOL_TO_WORKER.decode(sock.recv(copy=False).buffer)
        match msg:
            case m.PoolHello(pool_incarnation=new) if new != pool:
                if held:
                    log.warning("pool restarted (incarnation %d): dropping the %d requests "
                                "of the previous one", new, len(held))
                    runner.drop(sorted(held))
                    held.clear()
                pool = new
                sock.send(ready)
            case m.PoolHello():
                pass
            case m.StepPlan() if msg.incarnation != incarnation:
                log.warning("dropped step %d, addressed to incarnation %d of worker %d (this "
                            "is incarnation %d)", msg.step_id, msg.incarnation, worker_id,
                            incarnation)
            case m.StepPlan():
                held.difference_update(msg.finished_request_ids)
                held.update(r.request_id for r in msg.new_requests)
                _run_step(runner, sock, msg, worker_id, incarnation)
            case m.Shutdown():
                return


def _run_step(runner: ModelRunner, sock: zmq.Socket[Any], plan: m.StepPlan, worker_id: int,
              incarnation: int) -> None:
    start = time.perf_counter()
    try:
        result = runner.step(plan)
    except GroupError:
        log.exception("step %d broke the tensor-parallel group; exiting so the group "
                      "restarts", plan.step_id)
        raise
    except Exception as e:
        log.exception("step %d failed", plan.step_id)
        sock.send(ipc.encode(m.WorkerError(step_id=plan.step_id, worker_id=worker_id,
                                           message=f"{type(e).__name__}: {e}",
                                           incarnation=incarnation)))
        return
    result.incarnation = incarnation
    result.execute_time_s = time.perf_counter() - start
    sock.send(ipc.encode(result))


def lower_priority(cfg: EngineConfig) -> None:
    """Lower the CPU priority of a process that is only a worker (``--worker-sched``,
    resolved: ``idle`` for CPU workers on Linux; ``--worker-nice`` under ``normal``): on CPU
    its steps compete for the cores with the frontend and the pool, which should run the
    moment they wake. Called first, before the process starts threads (Linux sets both per
    thread, and threads inherit them). Not for a process that also supervises the control
    plane (a tensor-parallel rank 0 under torchrun): what it restarts would inherit it."""
    if cfg.worker.sched == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as e:  # a sandbox (seccomp) may forbid it; the worker still serves
            log.warning("--worker-sched idle: SCHED_IDLE refused (%s); this worker runs at "
                        "the normal policy", e)
    elif cfg.worker.nice:
        os.nice(cfg.worker.nice)


def run_worker(cfg: EngineConfig, slot: WorkerSlot, run_dir: str, *,
               incarnation: int = 0) -> None:
    """Process entry point of one worker of one pool (or of rank ``slot.tp_rank`` of its
    tensor-parallel group), started by the launcher's supervisor on ``slot.device``."""
    from engine.process import init_process

    init_process(f"engine-{slot.name}", cfg.launch.log_level)
    lower_priority(cfg)
    size = cfg.worker.tensor_parallel_size
    pool_index, worker_id, device = slot.pool_index, slot.worker_id, slot.device
    tp = None
    if size > 1:
        # The group meets through a file in the run directory, new for each incarnation.
        import torch.distributed as dist

        from engine.models.parallel import TensorParallel, init_world

        init_world(device, size, init_method=f"file://{run_dir}/tp-{pool_index}-{worker_id}-"
                   f"{incarnation}", rank=slot.tp_rank, world_size=size)
        tp = TensorParallel(rank=slot.tp_rank, size=size, group=dist.group.WORLD)
    serve_worker(cfg, pool_index, worker_id, incarnation,
                 pool_address=ipc.pool_addresses(run_dir, pool_index).workers,
                 launcher=run_dir, device=device, tp=tp)


def serve_worker(cfg: EngineConfig, pool_index: int, worker_id: int, incarnation: int, *,
                 pool_address: str, launcher: str, device: str | None = None,
                 tp: TensorParallel | None = None, curve: ipc.CurveKeys | None = None) -> None:
    """Load the model, dial the pool at ``pool_address``, say ready (to the pool, and to the
    launcher: its run directory, or its ``tcp://`` address from another node, dialed with
    the launch's CURVE keys ``curve``), then serve
    plans until the pool says stop. ``device`` overrides ``--device`` (a torchrun rank's
    own GPU). With ``tp``, rank 0 of the group does all that and the other ranks only run
    the forward passes it sends them (``NativeRunner.follow``). The caller has set the
    process up (``engine.process.init_process``) and, with ``tp``, its process group."""
    from engine.process import fail_start
    from engine.worker.factory import make_runner

    name = worker_name(pool_index, worker_id, tp.rank if tp is not None else 0)
    try:
        runner = make_runner(cfg.models[pool_index], cfg.cache, cfg.worker, cfg.scheduler,
                             device=device, tp=tp)
    except Exception as e:
        log.exception("%s failed to start", name)
        ipc.notify_launcher(launcher, m.ProcessFailed(name=name, message=repr(e)), curve)
        raise fail_start() from e
    if tp is not None and tp.rank > 0:
        ipc.notify_launcher(launcher, m.ProcessReady(name=name), curve)
        log.info("%s ready: following rank 0 of its tensor-parallel group", name)
        try:
            runner.follow()  # type: ignore[attr-defined]
        finally:
            runner.close()
        return
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ipc.make_socket(ctx, zmq.DEALER, pool_address, bind=False,
                           identity=ipc.worker_identity(worker_id), curve=curve)
    ipc.notify_launcher(launcher, m.ProcessReady(name=name, info={"num_blocks": runner.num_blocks}),
                        curve)
    log.info("%s ready: %d KV blocks of %d tokens", name, runner.num_blocks, runner.block_size)
    try:
        local = tp is None and pool_address.startswith("ipc://")  # one process, this host
        serve(runner, sock, worker_id, incarnation,  # says WorkerReady to the pool first
              pid=os.getpid() if local else 0)
    finally:
        runner.close()
        ctx.destroy(linger=0)
