"""``python -m engine.launch``: start every process, wait until each is ready, supervise.

Start order: one scheduler process per model pool, its workers, then the frontend. Each
reports ``ProcessReady`` (or ``ProcessFailed``) to the launcher's socket; when all have, the
launcher prints ``engine ready: http://HOST:PORT grpc://HOST:PORT`` on stdout. Then it supervises: a worker
that exits is restarted and its pool is told (the pool re-places the worker's requests, which
are recomputed; their streams go on). Any other process exiting is fatal. SIGINT/SIGTERM
stop everything: SIGTERM to each child, SIGKILL after a grace period; children also get
SIGKILL from the kernel if the launcher itself dies.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import zmq

from engine import ipc
from engine import messages as m
from engine.config import ConfigError, EngineConfig, config_from_args
from engine.frontend.process import run_frontend
from engine.models.info import load_model_info
from engine.pool.service import run_pool
from engine.scheduler.policy import get_policy
from engine.worker.factory import resolve_runner_config
from engine.worker.process import run_worker, worker_name

log = logging.getLogger("engine.launch")

SHUTDOWN_GRACE_S = 5.0


@dataclass
class Child:
    name: str
    proc: BaseProcess
    pool_index: int = -1
    worker_id: int = -1
    incarnation: int = 0
    tp_rank: int = 0  # a worker's rank in its tensor-parallel group (0: the leader)

    @property
    def is_worker(self) -> bool:
        return self.worker_id >= 0


class LaunchError(RuntimeError):
    pass


class Launcher:
    """``publish``: under torchrun, called once every pool is up with the TCP ports that
    workers on other ranks dial (``{"launcher_port": int, "worker_ports": [int per pool]}``);
    those workers count towards readiness like the launcher's own."""

    def __init__(self, cfg: EngineConfig,
                 publish: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg = cfg
        self.run_dir = tempfile.mkdtemp(prefix="engine-")
        self.mp = mp.get_context("spawn")
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.inbox = ipc.make_socket(self.ctx, zmq.PULL, ipc.launcher_address(self.run_dir), bind=True)
        self.publish = publish
        self.launcher_port: int | None = None
        if cfg.launch.listen_host is not None:
            self.launcher_port = ipc.bind_tcp(self.inbox, cfg.launch.listen_host)
        num_workers = cfg.worker.num_workers
        local = cfg.launch.num_local_workers
        self.num_local_workers = num_workers if local is None else min(local, num_workers)
        #: Workers that dial in from other ranks: ready when they say so, not supervised.
        self.remote_workers = [f"worker-{i}-{w}" for i in range(len(cfg.models))
                               for w in range(self.num_local_workers, num_workers)]
        self.worker_ports: dict[int, int] = {}
        self.children: dict[str, Child] = {}
        self.pool_controls = [
            ipc.make_socket(self.ctx, zmq.PUSH, ipc.pool_addresses(self.run_dir, i).control, bind=False)
            for i in range(len(cfg.models))
        ]
        self.restarts = 0
        self.stop_signal: int | None = None
        self.grpc_port = cfg.frontend.grpc_port
        self.http_port = cfg.frontend.http_port

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            self._start_all()
            self._wait_ready()
            host = self.cfg.frontend.host
            if ":" in host:
                host = f"[{host}]"
            print(f"engine ready: http://{host}:{self.http_port} grpc://{host}:{self.grpc_port}",
                  flush=True)
            return self._supervise()
        except LaunchError as e:
            log.error("%s", e)
            return 1
        finally:
            self.shutdown()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_signal = signum

    def _start_all(self) -> None:
        for i in range(len(self.cfg.models)):
            self._spawn(f"pool-{i}", run_pool, (self.cfg, i, self.run_dir), pool_index=i)
            for w in range(self.num_local_workers):
                self._start_worker(i, w, incarnation=0)
        self._spawn("frontend", run_frontend, (self.cfg, self.run_dir))

    def _spawn(self, name: str, target: Any, args: tuple[Any, ...], **kw: Any) -> Child:
        proc = self.mp.Process(target=target, args=args, name=name, daemon=False)
        proc.start()
        child = Child(name=name, proc=proc, **kw)
        self.children[name] = child
        return child

    def _start_worker(self, pool_index: int, worker_id: int, incarnation: int) -> None:
        """One worker: one process, or one per rank of its tensor-parallel group."""
        for rank in range(self.cfg.worker.tensor_parallel_size):
            self._spawn(worker_name(pool_index, worker_id, rank), run_worker,
                        (self.cfg, pool_index, worker_id, incarnation, self.run_dir, rank),
                        pool_index=pool_index, worker_id=worker_id, incarnation=incarnation,
                        tp_rank=rank)

    def _wait_ready(self) -> None:
        pending = set(self.children) | set(self.remote_workers)
        deadline = time.monotonic() + self.cfg.launch.ready_timeout_s
        while pending:
            if self.stop_signal is not None:
                raise LaunchError("interrupted while starting")
            if time.monotonic() > deadline:
                raise LaunchError(f"timed out after {self.cfg.launch.ready_timeout_s:.0f}s "
                                  f"waiting for {sorted(pending)} (--ready-timeout)")
            for child in self.children.values():
                if child.proc.exitcode is not None:
                    raise LaunchError(f"{child.name} exited with code {child.proc.exitcode} "
                                      "while starting")
            for msg in self._recv(timeout_ms=200):
                match msg:
                    case m.ProcessReady(name=name, info=info):
                        pending.discard(name)
                        if "worker_port" in info:
                            self._on_pool_port(self.children[name].pool_index,
                                               int(info["worker_port"]))
                        if name == "frontend":
                            self.grpc_port = int(info.get("grpc_port", self.grpc_port))
                            self.http_port = int(info.get("http_port", self.http_port))
                    case m.ProcessFailed(name=name, message=text):
                        raise LaunchError(f"{name} failed to start: {text}")

    def _on_pool_port(self, pool_index: int, port: int) -> None:
        self.worker_ports[pool_index] = port
        if self.publish is not None and len(self.worker_ports) == len(self.cfg.models):
            self.publish({"launcher_port": self.launcher_port,
                          "worker_ports": [self.worker_ports[i] for i in range(len(self.cfg.models))]})
            self.publish = None

    def _supervise(self) -> int:
        while self.stop_signal is None:
            for msg in self._recv(timeout_ms=200):
                if isinstance(msg, m.ProcessReady):
                    log.info("%s ready", msg.name)
                elif isinstance(msg, m.WorkerDied):  # a torchrun rank restarts its worker
                    log.warning("worker %d (incarnation %d) on another rank died; its "
                                "requests are recomputed", msg.worker_id, msg.incarnation)
                    self.pool_controls[msg.pool_index].send(ipc.encode(msg))
            for child in list(self.children.values()):
                code = child.proc.exitcode
                if code is None:
                    continue
                if not child.is_worker:
                    log.error("%s exited with code %s; stopping the engine", child.name, code)
                    return 1
                self._restart_worker(child, code)
        log.info("received %s; shutting down", signal.Signals(self.stop_signal).name)
        return 0

    def _restart_worker(self, child: Child, code: int) -> None:
        self.restarts += 1
        if self.restarts > self.cfg.launch.max_worker_restarts:
            raise LaunchError(f"{child.name} exited with code {code}; restart limit "
                              f"({self.cfg.launch.max_worker_restarts}) reached")
        log.warning("%s exited with code %s; restarting it", child.name, code)
        self.pool_controls[child.pool_index].send(ipc.encode(
            m.WorkerDied(worker_id=child.worker_id, incarnation=child.incarnation)))
        # The rest of its tensor-parallel group cannot go on without it (they may be blocked
        # in a collective, deaf to SIGTERM): the group restarts as one.
        for other in [c for c in self.children.values() if c is not child and c.is_worker
                      and (c.pool_index, c.worker_id) == (child.pool_index, child.worker_id)]:
            other.proc.kill()
            other.proc.join()
            other.proc.close()
            del self.children[other.name]
        child.proc.close()
        self._start_worker(child.pool_index, child.worker_id, child.incarnation + 1)

    def _recv(self, timeout_ms: int) -> list[m.ToLauncher]:
        out = []
        if self.inbox.poll(timeout_ms):
            while True:
                try:
                    out.append(ipc.TO_LAUNCHER.decode(self.inbox.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break
        return out

    def shutdown(self) -> None:
        """Stop the frontend first (no new requests), then pools and workers."""
        order = sorted(self.children.values(), key=lambda c: (c.name != "frontend", c.is_worker))
        for child in order:
            if child.proc.exitcode is None:
                child.proc.terminate()
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for child in order:
            child.proc.join(max(0.0, deadline - time.monotonic()))
            if child.proc.exitcode is None:
                log.warning("%s did not stop in %.0fs; killing it", child.name, SHUTDOWN_GRACE_S)
                child.proc.kill()
                child.proc.join()
        self.children.clear()
        self.ctx.destroy(linger=0)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def preflight(cfg: EngineConfig) -> EngineConfig:
    """What can be refused before any process starts (ConfigError naming the flag): the
    models' directories, a tensor-parallel size that does not split them, the policy, the
    runner's own constraints. Returns the config with the runner's choices resolved (the
    vllm runner's block size on CPU): the one every process is handed."""
    for model in cfg.models:
        load_model_info(model).check_tensor_parallel(cfg.worker.tensor_parallel_size)
    get_policy(cfg.scheduler.policy)
    return resolve_runner_config(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        logging.basicConfig(level=cfg.launch.log_level, stream=sys.stderr,
                            format="%(asctime)s launcher %(levelname)s: %(message)s")
        cfg = preflight(cfg)
    except (ConfigError, ValueError) as e:
        print(f"python -m engine.launch: error: {e}", file=sys.stderr)
        return 2
    return Launcher(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
