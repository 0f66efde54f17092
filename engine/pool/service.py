"""The scheduler process of one model pool: sockets around the pure ``Scheduler``.

One thread, one loop: drain every socket without blocking, hand what arrived to the
engine core (engine/core.py: the scheduler's one drive loop; each worker is a ``_WorkerSocket``
handle, whose results arrive later on the worker socket), give each idle worker its next
step (``core.step``), send the outputs of this turn in one batch.
It blocks in ``poll`` only when no worker can be given work, and never past the next
heartbeat: stats go out every ``STATS_INTERVAL_S``, idle or not, each stamped with this
process's ``incarnation`` (random, drawn at start): a frontend that sees it change knows the
pool was restarted and resubmits its requests as continuations. With
``--kv-events-config``, the scheduler's KV events are drained each turn, before its outputs
go out, and handed to the publisher's thread (engine.kv_events).

Worker death and restart. Every incarnation of a worker dials in under the same identity,
and the ROUTER routes to the newest connection: once a restarted worker is connected, a
plan the pool sends to the dead incarnation (not yet heard of as dead) reaches the new one.
The launcher's ``WorkerDied`` comes on the control socket, the new incarnation's
``WorkerReady`` and the dead one's last results on the worker socket, in any order. So plans
and results carry the incarnation, and:

- a worker runs only plans addressed to its own incarnation (engine/worker/process.py);
- the pool schedules an incarnation only from its ``WorkerReady`` on, until its
  ``WorkerDied`` or a newer incarnation's ``WorkerReady``, whichever comes first (either
  re-places its requests, once); a hello of an incarnation already dead or replaced is
  ignored, and so is a death of one already replaced;
- a ``StepResult`` or ``WorkerError`` counts only if it answers the plan in flight, from the
  incarnation it was sent to; anything else is a dead incarnation's and is dropped.

Pool restart. When this process dies the launcher starts a new one on the same sockets;
the workers live on and their DEALERs reconnect. Each incarnation greets every worker
(``PoolHello``, once, before its first plan to it): the worker ids of the config, as soon as
each is connected (``ROUTER_MANDATORY`` refuses a send to an identity not connected yet, so
the greeting is retried every ``GREET_RETRY_S`` until it goes out), and any other worker
that registers. A worker greeted by an incarnation it does not know drops every request it
holds and answers ``WorkerReady`` (engine/worker/process.py); a repeated ``WorkerReady``
of the incarnation already registered (a worker greeted at start) is ignored here.
A worker is given plans only once greeted, so a worker's stream holds the old pool's
messages, then the hello, then this pool's plans. ``close`` tells the workers to stop only
when the engine stops (SIGTERM, the launcher's ``Shutdown``) or when no restart comes
(under torchrun, where a pool's death stops the engine); a pool that crashes leaves them
waiting for the next one.

Frontend death. The frontend's connections die with it, so every request this pool holds
is abandoned (there is one frontend). Sends to the frontend never block: ``outputs`` is a
PUSH with an unbounded high-water mark, which blocks only while no frontend is connected,
so each batch goes out with ``NOBLOCK`` and one that finds no frontend is dropped, stats
included (the restarted frontend reads the next heartbeat, ``STATS_INTERVAL_S`` later).
The launcher tells the pool on the control socket (``FrontendDied`` with the dead
incarnation); every ``AddRequest`` names the frontend incarnation that sent it, so the pool
aborts exactly the requests of that incarnation and older (freeing their KV; their final
outputs are dropped, nobody reads them), and drops an ``AddRequest`` of a dead incarnation
that arrives later (ZeroMQ may still deliver what the dead frontend had queued). The order
of the control socket and the request socket does not matter: a restarted frontend's
requests carry a newer incarnation and are never aborted by its predecessor's death.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import zmq

from engine import ipc
from engine import messages as m
from engine.config import EngineConfig
from engine.core import EngineCore, WorkerLost
from engine.kv_events import KVEventPublisher
from engine.models.info import load_model_info
from engine.pool.first_token import FirstTokenTimer
from engine.pool.suspend import Suspender
from engine.profiling import StepProfiler, profile_path
from engine.scheduler.record import (
    close_recording,
    open_scheduler,
    plan_encoder,
    pool_record_path,
    result_tap,
)

log = logging.getLogger(__name__)

#: Stats reach the frontend at least this often, outputs or not: they are the pool's
#: heartbeat (the frontend says NOT_SERVING after 1 s without them) and admission's input.
STATS_INTERVAL_S = 0.25
#: How often a pool retries greeting (``PoolHello``) the config's workers not connected yet.
GREET_RETRY_S = 0.02


class PoolService:
    def __init__(self, cfg: EngineConfig, pool_index: int, run_dir: str,
                 clock: Callable[[], float] = time.time, listen_host: str | None = None,
                 curve: ipc.CurveKeys | None = None) -> None:
        model_cfg = cfg.models[pool_index]
        self.name = model_cfg.name
        self.info = load_model_info(model_cfg)
        events = cfg.cache.kv_events
        self.scheduler = open_scheduler(
            cfg.scheduler, block_size=cfg.cache.block_size,
            max_model_len=self.info.max_model_len, kv_events=events is not None,
            record_path=pool_record_path(cfg.scheduler.record_decisions, pool_index,
                                         len(cfg.models)), run_id=run_dir, pool=self.name)
        self.first_token = FirstTokenTimer(clock)  # stamps for Server-Timing
        self.core = EngineCore(self.scheduler, observer=self.first_token)
        # Recording decisions taps the wire: the plan bytes sent, the result bytes received.
        self.encode_plan = plan_encoder(self.scheduler, ipc.encode)
        self.tap = result_tap(self.scheduler)
        self.kv_events = (None if events is None
                          else KVEventPublisher(events, pool_index, cfg.cache.block_size))
        self.clock = clock
        # Pauses workers whose step holds only outranked work while a critical prompt's step
        # runs on a worker sharing their cores (the scheduler says which: engine/pool/suspend.py).
        self.suspender = Suspender(cfg.scheduler.workers_share_cores == "yes")
        self.incarnation = secrets.randbits(63) | 1  # never 0 ("unknown")
        addrs = ipc.pool_addresses(run_dir, pool_index)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.requests = ipc.make_socket(self.ctx, zmq.PULL, addrs.requests, bind=True)
        self.outputs = ipc.make_socket(self.ctx, zmq.PUSH, addrs.outputs, bind=True)
        self.workers = ipc.make_socket(self.ctx, zmq.ROUTER, addrs.workers, bind=True)
        # Under torchrun, workers on other ranks dial in over TCP (CURVE: engine.ipc).
        self.worker_port: int | None = None
        if listen_host is not None:
            assert curve is not None, "a TCP listener needs the launch's CURVE keys"
            self.worker_port = ipc.bind_tcp(self.workers, listen_host, curve)
        self.control = ipc.make_socket(self.ctx, zmq.PULL, addrs.control, bind=True)
        self.poller = zmq.Poller()
        for sock in (self.requests, self.workers, self.control):
            self.poller.register(sock, zmq.POLLIN)
        #: Workers to greet: the config's, and any other that registers.
        self.expected = set(range(cfg.worker.num_workers))
        #: Called once, when stats showing every worker of the config registered have gone
        #: to the frontend (``run_pool``: tells the launcher, whose ready line waits for it).
        self.on_workers_ready: Callable[[], None] | None = None
        self.greeted: set[int] = set()
        self.dead: dict[int, int] = {}  # worker id -> its newest incarnation reported dead
        self.sent_at: dict[int, float] = {}  # worker id -> when its in-flight plan was sent
        # Per step finished since the latest stats: batch size, tokens, seconds, worker id.
        self.steps: tuple[list[int], list[int], list[float], list[int]] = ([], [], [], [])
        self.last_stats = 0.0
        self.running = True
        #: Request id -> the frontend incarnation that sent it, while the scheduler holds it.
        self.owners: dict[str, int] = {}
        self.frontend_dead = -1  # the newest frontend incarnation reported dead
        self.frontend_connected = False  # whether the latest batch found a frontend
        path = cfg.launch.profile_steps
        self.profiler = None if path is None else StepProfiler(
            profile_path(path, pool_index), pool_index, self.incarnation, cfg.cache.block_size)

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        while self.running:
            busy = self.core.has_work()
            ready = dict(self.poller.poll(0 if busy else self._until_stats_ms()))
            now = self.clock()
            if self.control in ready:
                self._drain(self.control, ipc.LAUNCHER_TO_POOL, self._on_control)
            if self.workers in ready:
                self._drain_workers()
            if self.requests in ready:
                self._drain(self.requests, ipc.FRONTEND_TO_POOL, self._on_request)
            self._greet()
            self.core.step(now)
            if self.kv_events is not None:
                self.kv_events.publish(self.scheduler.drain_kv_events(), now)
            self._flush(now)

    def close(self, stop_workers: bool = True) -> None:
        """Tell every worker to stop (the launcher also signals the workers it started;
        workers that dialed in from other ranks only hear this), then close the sockets.
        ``stop_workers=False``: leave them waiting for the pool's next incarnation."""
        for w in self.scheduler.workers if stop_workers else ():
            with contextlib.suppress(zmq.ZMQError):  # not connected: nothing to tell
                self.workers.send_multipart([ipc.worker_identity(w), ipc.encode(m.Shutdown())],
                                            zmq.NOBLOCK)
        self.suspender.close()
        if self.kv_events is not None:
            self.kv_events.close()
        close_recording(self.scheduler)
        if self.profiler is not None:
            self.profiler.close()
        ipc.destroy(self.ctx, linger=500 if self.worker_port is not None else 0)

    def _drain(self, sock: zmq.Socket[Any], codec: ipc.Codec[Any], handle: Callable[[Any], None]) -> None:
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(codec.decode(frame.buffer))

    def _drain_workers(self) -> None:
        while True:
            try:
                _identity, frame = self.workers.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg = ipc.WORKER_TO_POOL.decode(frame.buffer)
            if self.tap is not None and isinstance(msg, m.StepResult):
                self.tap(msg, frame.buffer)
            self._on_worker(msg)

    # ------------------------------------------------------------------ handlers

    def _on_request(self, msg: m.FrontendToPool) -> None:
        now = self.clock()
        match msg:
            case m.AddRequest(request=req, frontend_incarnation=inc):
                if inc <= self.frontend_dead:
                    log.info("dropped request %s of dead frontend incarnation %d",
                             req.request_id, inc)
                    return
                self.owners[req.request_id] = inc
                if self.profiler is not None:
                    self.profiler.on_add(req, now)
                self.core.add(req, now)
            case m.AbortRequests(request_ids=ids):
                self.core.abort(ids, now)

    def _on_worker(self, msg: m.WorkerToPool) -> None:
        now = self.clock()
        match msg:
            case m.WorkerReady():
                self._on_ready(msg, now)
            case m.StepResult(worker_id=w):
                self.suspender.resume(w)
                plan = self.core.complete(w, msg, now)
                if plan is None:
                    self._stale(w, msg.step_id, msg.incarnation)
                else:
                    self._record_step(plan, now - self.sent_at.get(w, now))
                    if self.profiler is not None:
                        self.profiler.on_result(plan, msg, now)
            case m.WorkerError(worker_id=w, message=text):
                self.suspender.resume(w)
                if self.core.fail(w, msg.step_id, msg.incarnation, text, now) is None:
                    self._stale(w, msg.step_id, msg.incarnation)
                else:
                    log.error("worker %d failed a step: %s", w, text)

    def _on_ready(self, msg: m.WorkerReady, now: float) -> None:
        w, inc = msg.worker_id, msg.incarnation
        if msg.protocol_version != m.PROTOCOL_VERSION:
            log.error("worker %d speaks protocol %d, pool %d: ignored", w,
                      msg.protocol_version, m.PROTOCOL_VERSION)
            return
        ws = self.scheduler.workers.get(w)
        if inc <= self.dead.get(w, -1) or (ws is not None and inc < ws.incarnation):
            log.warning("worker %d: hello of incarnation %d ignored (that incarnation is dead "
                        "or replaced)", w, inc)
            return
        if ws is not None and inc == ws.incarnation:  # it answers this pool's greeting
            log.debug("worker %d (incarnation %d): registered already", w, inc)
            return
        if ws is not None:  # its WorkerDied is still on its way
            log.warning("worker %d incarnation %d replaces incarnation %d; %d requests "
                        "re-placed to recompute", w, inc, ws.incarnation, ws.num_requests)
        log.info("worker %d (incarnation %d) ready with %d KV blocks", w, inc, msg.num_blocks)
        self.suspender.register(w, msg.pid)
        self.core.add_worker(w, _WorkerSocket(self, w), msg.num_blocks, now, inc)
        self.last_stats = -STATS_INTERVAL_S  # the frontend hears of the worker at once

    def _on_died(self, w: int, inc: int) -> None:
        self.dead[w] = max(inc, self.dead.get(w, -1))
        ws = self.scheduler.workers.get(w)
        if ws is None or ws.incarnation > inc:
            log.info("worker %d incarnation %d died (already replaced)", w, inc)
            return
        self.suspender.forget(w)
        moved = self.core.remove_worker(w, self.clock())
        log.warning("worker %d died; %d requests re-placed to recompute", w, len(moved))

    def _on_control(self, msg: m.LauncherToPool) -> None:
        match msg:
            case m.WorkerDied(worker_id=w, incarnation=inc):
                self._on_died(w, inc)
            case m.FrontendDied(incarnation=inc):
                self._on_frontend_died(inc)
            case m.Shutdown():
                self.running = False

    def _on_frontend_died(self, inc: int) -> None:
        """Abort every request of frontend incarnation ``inc`` or older; their final outputs
        are dropped (the frontend they were for is gone)."""
        self.frontend_dead = max(inc, self.frontend_dead)
        ids = [rid for rid, owner in self.owners.items() if owner <= inc]
        for rid in ids:
            del self.owners[rid]
        self.core.abort(ids, self.clock())
        gone = set(ids)
        self.core.outputs = [o for o in self.core.outputs if o.request_id not in gone]
        log.warning("frontend incarnation %d died; aborted its %d requests", inc, len(ids))

    @staticmethod
    def _stale(worker_id: int, step_id: int, incarnation: int) -> None:
        log.info("worker %d: dropped a stale answer to step %d from incarnation %d",
                 worker_id, step_id, incarnation)

    # ------------------------------------------------------------------ output

    def _greet(self) -> None:
        """Greet each worker of the config (or registered) not greeted yet, if connected."""
        for w in (self.expected | self.scheduler.workers.keys()) - self.greeted:
            self._hello(w)

    def _hello(self, w: int) -> bool:
        """Send worker ``w`` this incarnation's ``PoolHello`` unless done; False while it
        is not connected (``ROUTER_MANDATORY``: retried next turn)."""
        if w not in self.greeted:
            hello = m.PoolHello(pool_incarnation=self.incarnation)
            try:
                self.workers.send_multipart([ipc.worker_identity(w), ipc.encode(hello)],
                                            zmq.NOBLOCK)
            except zmq.ZMQError:
                return False
            self.greeted.add(w)
        return True

    def _record_step(self, plan: m.StepPlan, duration_s: float) -> None:
        sizes, tokens, times, worker_ids = self.steps
        sizes.append(plan.num_requests)
        tokens.append(plan.num_scheduled_tokens)
        times.append(duration_s)
        worker_ids.append(plan.worker_id)

    def _stats(self) -> m.PoolStats:
        stats = self.scheduler.stats()
        stats.worker_ids = sorted(self.scheduler.workers)
        stats.num_waiting_per_worker = [self.scheduler.num_waiting(w) for w in stats.worker_ids]
        (stats.step_batch_sizes, stats.step_num_tokens, stats.step_times_s,
         stats.step_worker_ids) = self.steps
        stats.pool_incarnation = self.incarnation
        self.steps = ([], [], [], [])
        return stats

    def _until_stats_ms(self) -> int:
        """Milliseconds until the next heartbeat is due (an idle poll wakes up for it)."""
        due = self.last_stats + STATS_INTERVAL_S - self.clock()
        if not self.expected <= self.greeted:  # and again soon for the greetings due
            due = min(due, GREET_RETRY_S)
        return max(0, min(int(STATS_INTERVAL_S * 1000), int(due * 1000) + 1))

    def _flush(self, now: float) -> None:
        if not self.core.outputs and now - self.last_stats < STATS_INTERVAL_S:
            return
        pending = self.core.take_outputs()
        self.first_token.on_flush(pending, self.clock())
        msg = m.PoolOutputs(outputs=pending, stats=self._stats())
        if self.profiler is not None:
            self.profiler.on_outputs(pending, self.clock())
        for out in pending:
            if out.finish_reason is not None:
                self.owners.pop(out.request_id, None)
        try:  # never block the loop on the frontend: without one, the batch is dropped
            self.outputs.send(ipc.encode(msg), zmq.NOBLOCK)
            if not self.frontend_connected:
                log.info("frontend connected")
            self.frontend_connected = True
        except zmq.Again:
            if self.frontend_connected:
                log.warning("no frontend connected: dropping outputs and stats until one is")
            self.frontend_connected = False
        self.last_stats = now
        if (self.on_workers_ready is not None and self.frontend_connected
                and self.expected <= self.scheduler.workers.keys()):
            self.on_workers_ready()  # after the stats that show every worker went out
            self.on_workers_ready = None


class _WorkerSocket:
    """Worker ``w`` as the engine core drives it: ready once this pool greeted it; a plan
    goes out on the ROUTER, its result comes back later (``PoolService._on_worker``)."""

    __slots__ = ("identity", "service", "worker_id")

    def __init__(self, service: PoolService, worker_id: int) -> None:
        self.service = service
        self.worker_id = worker_id
        self.identity = ipc.worker_identity(worker_id)

    def ready(self) -> bool:
        return self.service._hello(self.worker_id)  # a plan may only follow this pool's hello

    def submit(self, plan: m.StepPlan, now: float) -> None:
        try:
            self.service.workers.send_multipart([self.identity, self.service.encode_plan(plan)])
        except zmq.ZMQError as e:  # the worker is gone; the launcher restarts it
            log.warning("worker %d unreachable (%s); re-placing its requests",
                        self.worker_id, e)
            raise WorkerLost from e
        self.service.sent_at[self.worker_id] = now
        held = self.service.scheduler.outranked_in_flight(self.worker_id)
        if held:
            self.service.suspender.suspend(self.worker_id, held)
        if self.service.profiler is not None:
            self.service.profiler.on_send(plan, self.service.clock())


def run_pool(cfg: EngineConfig, pool_index: int, run_dir: str,
             listen_host: str | None = None, curve: ipc.CurveKeys | None = None) -> None:
    """Process entry point of a pool's scheduler (``listen_host``: its worker socket also
    listens on TCP there, as a CURVE server with ``curve``, for workers on other torchrun
    ranks)."""
    from engine.process import fail_start, init_process

    name = f"pool-{pool_index}"
    init_process(f"engine-{name}", cfg.launch.log_level)
    try:
        service = PoolService(cfg, pool_index, run_dir, listen_host=listen_host, curve=curve)
    except Exception as e:
        log.exception("pool %d failed to start", pool_index)
        ipc.notify_launcher(run_dir, m.ProcessFailed(name=name, message=repr(e)))
        raise fail_start() from e
    info = {} if service.worker_port is None else {"worker_port": service.worker_port}
    from engine.heap import freeze_startup_heap

    freeze_startup_heap()  # no full collection walks the startup heap between steps
    ipc.notify_launcher(run_dir, m.ProcessReady(name=name, info=info))
    # The launcher's ready line also waits for this: each worker registered (health ok).
    service.on_workers_ready = lambda: ipc.notify_launcher(
        run_dir, m.ProcessReady(name=ipc.workers_ready_name(pool_index)))
    # A crash leaves the workers to the restarted pool; under torchrun (TCP) none comes.
    stop_workers = listen_host is not None
    try:
        service.run()
        stop_workers = True  # the launcher's Shutdown
    except SystemExit:  # SIGTERM: the engine stops
        stop_workers = True
        raise
    finally:
        service.close(stop_workers)
