"""``python -m engine.launch``: resolve the config, start every process, wait until each is
ready, supervise.

    flags + TOML -> EngineConfig -> resolve_config (every "auto" decided, engine.resolve)
                 -> Topology (pools, workers, devices, engine.topology)
                 -> Supervisor: pool per model, its workers, then the frontend

Each child reports ``ProcessReady`` (or ``ProcessFailed``) to the launcher's socket, and
each pool again once every worker of its config has registered with it; when all have, the
launcher prints ``engine ready: http://HOST:PORT grpc://HOST:PORT`` on stdout.
Then it supervises (``engine.supervisor``): a worker that exits is restarted (its whole
tensor-parallel group with it, with backoff, up to ``--max-restarts`` in
``--restart-window``) and its pool is told (the pool re-places the worker's requests, which
are recomputed; their streams go on). A pool that exits is restarted the same way, on the
same sockets: its workers live on and register with the new incarnation when it greets them
(engine/pool/service.py, engine/worker/process.py), and the frontend resubmits its open
requests as continuations (engine/frontend/pool_client.py). Under torchrun (pools listening
on TCP ports published once to the other ranks) a pool's exit is fatal. A frontend that
exits is restarted on the ports it had bound (the same ones when they were chosen by the
OS), everywhere, torchrun included (it lives with the launcher, and talks to the pools over
``ipc://``); every pool is told (``FrontendDied``) and aborts that frontend's requests,
whose clients' connections died with it. A restart storm (``--max-restarts`` failures in
``--restart-window``) stops the engine with exit code 1; first, while the frontend lives,
the launcher tells it (``NotServing``) and waits ``NOT_SERVING_S`` so that health probes
see NOT_SERVING and why. SIGINT/SIGTERM stop everything. Children get SIGKILL from the
kernel if the launcher itself dies.

This module does not import the frontend stack (fastapi, grpc) or a runner: each child
imports its own (``engine.child``), so torchrun's ranks, which import this module, do not
load them either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from engine import ipc
from engine import messages as m
from engine.cli import config_from_args
from engine.config import ConfigError, EngineConfig
from engine.resolve import resolve_config
from engine.supervisor import (
    Child,
    ProcessSpec,
    RestartPolicy,
    RestartStorm,
    Supervisor,
    SupervisorError,
)
from engine.topology import Topology, WorkerSlot

log = logging.getLogger("engine.launch")


POOL_TARGET = "engine.pool.service:run_pool"
FRONTEND = "frontend"
#: How long the frontend says NOT_SERVING (with the reason) before a restart storm stops
#: the engine: several probes of a load balancer or Kubernetes (periods of 1 s and up).
NOT_SERVING_S = 3.0


class LaunchError(RuntimeError):
    pass


def process_specs(cfg: EngineConfig, topo: Topology, run_dir: str) -> list[ProcessSpec]:
    """Every process this launcher starts, in start order (pools, workers, frontend)."""
    # Under torchrun a restarted pool would bind other TCP ports than those the other ranks
    # were given: its death stays fatal there.
    restart_pools = topo.listen_host is None
    specs = [ProcessSpec(f"pool-{i}", POOL_TARGET, (cfg, i, run_dir, topo.listen_host,
                                                     topo.curve),
                         restart=restart_pools) for i in topo.pools]
    specs += [ProcessSpec(slot.name, "engine.worker.process:run_worker", (cfg, slot, run_dir),
                          restart=True, group=slot.group, pass_incarnation=True)
              for slot in topo.local_workers]
    specs.append(ProcessSpec(FRONTEND, "engine.frontend.process:run_frontend", (cfg, run_dir),
                             restart=True, pass_incarnation=True))
    return specs


def restart_policy(cfg: EngineConfig) -> RestartPolicy:
    return RestartPolicy(max_restarts=cfg.launch.max_restarts,
                         window_s=cfg.launch.restart_window_s)


class Launcher:
    """``publish``: under torchrun, called once every pool is up with the TCP ports that
    workers on other ranks dial (``{"launcher_port": int, "worker_ports": [int per pool]}``)."""

    def __init__(self, cfg: EngineConfig, topology: Topology | None = None,
                 publish: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg = cfg
        self.topo = topology or Topology.local(cfg)
        self.run_dir = ipc.make_run_dir()  # 0700: the ipc:// sockets are only ours
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.inbox = ipc.make_socket(self.ctx, zmq.PULL, ipc.launcher_address(self.run_dir), bind=True)
        self.publish = publish
        self.launcher_port: int | None = None
        if self.topo.listen_host is not None:
            assert self.topo.curve is not None, "Topology checks it"
            self.launcher_port = ipc.bind_tcp(self.inbox, self.topo.listen_host, self.topo.curve)
        self.worker_ports: dict[int, int] = {}
        self.pool_controls = [
            ipc.make_socket(self.ctx, zmq.PUSH, ipc.pool_addresses(self.run_dir, i).control, bind=False)
            for i in self.topo.pools
        ]
        self.frontend_control = ipc.make_socket(self.ctx, zmq.PUSH,
                                                ipc.frontend_control_address(self.run_dir),
                                                bind=False)
        self.supervisor = Supervisor(restart_policy(cfg), on_restart=self._child_died)
        self.stop_signal: int | None = None
        self.grpc_port = cfg.frontend.grpc_port
        self.http_port = cfg.frontend.http_port

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            self.supervisor.spawn_all(process_specs(self.cfg, self.topo, self.run_dir))
            self._wait_ready()
            host = self.cfg.frontend.host
            if ":" in host:
                host = f"[{host}]"
            print(f"engine ready: http://{host}:{self.http_port} grpc://{host}:{self.grpc_port}",
                  flush=True)
            return self._supervise()
        except (LaunchError, SupervisorError) as e:
            log.error("%s", e)
            return 1
        finally:
            self.shutdown()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_signal = signum

    def _wait_ready(self) -> None:
        # Every process, and every pool's workers registered (the pool says so once they
        # are: a worker is ready before its pool has heard it, and health is not ok until).
        pending = (set(self.supervisor.children) | set(self.topo.remote_workers)
                   | {ipc.workers_ready_name(i) for i in self.topo.pools})
        deadline = time.monotonic() + self.cfg.launch.ready_timeout_s
        while pending:
            if self.stop_signal is not None:
                raise LaunchError("interrupted while starting")
            if time.monotonic() > deadline:
                raise LaunchError(f"timed out after {self.cfg.launch.ready_timeout_s:.0f}s "
                                  f"waiting for {sorted(pending)} (--ready-timeout)")
            try:  # a worker that crashes at start is restarted with backoff
                self.supervisor.check()
            except SupervisorError as e:
                raise LaunchError(f"{e} while starting") from e
            for msg in self._recv(timeout_ms=200):
                match msg:
                    case m.ProcessReady(name=name, info=info):
                        pending.discard(name)
                        if "worker_port" in info:
                            self._on_pool_port(int(name.removeprefix("pool-")),
                                               int(info["worker_port"]))
                        if name == FRONTEND:
                            self._on_frontend_ports(int(info.get("http_port", self.http_port)),
                                                    int(info.get("grpc_port", self.grpc_port)))
                    case m.ProcessFailed(name=name, message=text):
                        raise LaunchError(f"{name} failed to start: {text}")

    def _on_frontend_ports(self, http_port: int, grpc_port: int) -> None:
        """The frontend bound these ports: its restarts bind them again (``--http-port 0``
        picks a port once)."""
        self.http_port, self.grpc_port = http_port, grpc_port
        child = self.supervisor.children[FRONTEND]
        cfg, run_dir = child.spec.args
        cfg = dataclasses.replace(cfg, frontend=dataclasses.replace(
            cfg.frontend, http_port=http_port, grpc_port=grpc_port))
        child.spec = dataclasses.replace(child.spec, args=(cfg, run_dir))

    def _on_pool_port(self, pool_index: int, port: int) -> None:
        self.worker_ports[pool_index] = port
        if self.publish is not None and len(self.worker_ports) == self.topo.num_pools:
            self.publish({"launcher_port": self.launcher_port,
                          "worker_ports": [self.worker_ports[i] for i in self.topo.pools]})
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
            if self.stop_signal is not None:  # Ctrl-C: children may be exiting already
                break
            try:
                self.supervisor.check()  # raises when the engine must stop
            except RestartStorm as e:
                self._report_not_serving(str(e))
                raise
        log.info("received %s; shutting down", signal.Signals(self.stop_signal).name)
        return 0

    def _report_not_serving(self, reason: str) -> None:
        """A restart storm stops the engine: if the frontend lives, it says NOT_SERVING with
        ``reason`` for ``NOT_SERVING_S`` first (Ctrl-C cuts the wait short)."""
        frontend = self.supervisor.children.get(FRONTEND)
        if frontend is None or frontend.exitcode is not None:
            return
        log.error("restart storm: %s; health says NOT_SERVING for %.0f s, then the engine "
                  "stops", reason, NOT_SERVING_S)
        with contextlib.suppress(zmq.ZMQError):
            self.frontend_control.send(ipc.encode(m.NotServing(reason=f"restart storm: {reason}")),
                                       zmq.NOBLOCK)
        deadline = time.monotonic() + NOT_SERVING_S
        while self.stop_signal is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def _child_died(self, child: Child, incarnation: int) -> None:
        """A local worker (or a rank of its group) died: the pool recomputes its requests.
        A pool died: nothing to tell (its restart greets its workers, the frontend sees the
        new incarnation in its stats), but a worker it paused is continued. The frontend
        died: every pool aborts its requests."""
        if child.spec.target == POOL_TARGET:
            log.warning("%s died; its open requests are resubmitted to its restart", child.name)
            self.supervisor.resume_all()  # it may have left a worker paused
            return
        if child.name == FRONTEND:
            log.warning("the frontend (incarnation %d) died; its requests are aborted, it "
                        "restarts on ports http %d, grpc %d", child.incarnation, self.http_port,
                        self.grpc_port)
            for control in self.pool_controls:
                control.send(ipc.encode(m.FrontendDied(incarnation=child.incarnation)))
            return
        slot = child.spec.args[1]
        assert isinstance(slot, WorkerSlot), child.spec
        self.pool_controls[slot.pool_index].send(ipc.encode(
            m.WorkerDied(worker_id=slot.worker_id, incarnation=child.incarnation)))

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
        """Stop the frontend first (no new requests), then pools, then workers."""
        self.supervisor.shutdown(order=lambda c: (c.name != FRONTEND,
                                                  c.spec.target != POOL_TARGET))
        ipc.destroy(self.ctx, linger=0)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        logging.basicConfig(level=cfg.launch.log_level, stream=sys.stderr,
                            format="%(asctime)s launcher %(levelname)s: %(message)s")
        cfg = resolve_config(cfg)
    except (ConfigError, ValueError) as e:
        print(f"python -m engine.launch: error: {e}", file=sys.stderr)
        return 2
    return Launcher(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
