"""The frontend process: load each pool's model info and tokenizer, connect to the pools,
serve gRPC and HTTP on one event loop (sharing the pools, the metrics and the request
lifecycle), report ready to the launcher, serve until SIGTERM / SIGINT.

The launcher restarts a frontend that dies, on the same ports (the HTTP socket and gRPC's
both set ``SO_REUSEADDR``), with the next ``incarnation``: every ``AddRequest`` carries it,
so the pools can abort the requests of a dead incarnation (engine/pool/service.py). The
frontend listens on its control socket for the launcher's ``NotServing`` (a restart storm
stops the engine): health says NOT_SERVING with the reason until the launcher stops it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, cast

import zmq
import zmq.asyncio

from engine import ipc
from engine.config import EngineConfig
from engine.frontend import health
from engine.frontend.admission import Admission
from engine.frontend.grpc_server import start_grpc_server
from engine.frontend.http_server import start_http_server
from engine.frontend.metrics import EngineMetrics
from engine.frontend.openai_server import OpenAIServer
from engine.frontend.pool_client import PoolClient
from engine.frontend.serving import ModelRegistry, ServedModel
from engine.heap import freeze_startup_heap
from engine.messages import NotServing, ProcessFailed, ProcessReady
from engine.models.info import load_model_info

log = logging.getLogger("engine.frontend")

#: Seconds running streams get to finish on shutdown before they are cancelled.
SHUTDOWN_GRACE_S = 2.0


def load_tokenizer(path: str) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def connect_models(cfg: EngineConfig, run_dir: str, incarnation: int = 0) -> list[ServedModel]:
    """One ``ServedModel`` per pool, in config order; call inside the running loop."""
    served = []
    for i, model_cfg in enumerate(cfg.models):
        info = load_model_info(model_cfg)
        tokenizer = load_tokenizer(str(info.path))
        pool = PoolClient(ipc.pool_addresses(run_dir, i), name=info.name,
                          resume_timeout_s=cfg.frontend.max_queue_time_s,
                          frontend_incarnation=incarnation)
        served.append(ServedModel(info=info, tokenizer=tokenizer, pool=pool))
    return served


async def _listen_to_launcher(sock: zmq.asyncio.Socket) -> None:
    """Apply the launcher's messages (``NotServing``) until cancelled."""
    while True:
        msg = ipc.LAUNCHER_TO_FRONTEND.decode(await sock.recv())
        if isinstance(msg, NotServing):
            log.error("the engine is stopping: %s; health says NOT_SERVING", msg.reason)
            health.report_not_serving(msg.reason)


async def _serve(cfg: EngineConfig, run_dir: str,
                 on_ready: Callable[[dict[str, int]], None], incarnation: int = 0) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    control = cast(zmq.asyncio.Socket, ipc.make_socket(
        zmq.asyncio.Context.instance(), zmq.PULL, ipc.frontend_control_address(run_dir),
        bind=True))
    listener: asyncio.Task[Any] = loop.create_task(_listen_to_launcher(control),
                                                   name="launcher-control")
    models = ModelRegistry(connect_models(cfg, run_dir, incarnation))
    metrics = EngineMetrics()
    for m in models:
        metrics.add_pool(m.name, m.pool)
    f = cfg.frontend
    admission = Admission(models, f, cfg.scheduler.max_num_seqs,
                          cfg.scheduler.max_num_batched_tokens)
    try:
        # Ready means /health says so: every pool has reported its workers (pools report
        # every STATS_INTERVAL_S; the launcher starts the frontend after all workers).
        await asyncio.wait_for(asyncio.gather(*(m.pool.has_stats.wait() for m in models)),
                               cfg.launch.ready_timeout_s)
        grpc_server, grpc_port = await start_grpc_server(
            models, f.host, f.grpc_port, metrics, admission,
            structured_any_whitespace=f.structured_outputs_any_whitespace)
        http = await start_http_server(OpenAIServer(models, f, admission, metrics), f.host,
                                       f.http_port)
        freeze_startup_heap()  # the tokenizer's heap: a full collection stalled the loop
        on_ready({"grpc_port": grpc_port, "http_port": http.port})
        log.info("frontend (incarnation %d) ready: http port %d, grpc port %d, models %s, "
                 "event loop %s", incarnation, http.port, grpc_port, [m.name for m in models],
                 type(asyncio.get_running_loop()).__module__)
        await stop.wait()
        log.info("frontend stopping")
        await asyncio.gather(grpc_server.stop(SHUTDOWN_GRACE_S), http.stop(SHUTDOWN_GRACE_S))
    finally:
        listener.cancel()
        admission.close()
        for m in models:
            await m.pool.close()
        control.close()


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (a dependency on Linux and macOS), else
    asyncio's own (None). Everything the frontend does runs on this one loop: accepting
    connections, HTTP parsing, gRPC, the pools' ZeroMQ sockets. Under a flood of one
    connection per request the loop's own cost per connection is part of what a critical
    request queues behind: on uvloop (libuv) a shed 429 costs the frontend about a quarter
    less CPU (docs/benchmarks.md, "Flood", seventh pass). ``ENGINE_FRONTEND_LOOP=asyncio``
    keeps asyncio's loop."""
    if os.environ.get("ENGINE_FRONTEND_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)


def run_frontend(cfg: EngineConfig, run_dir: str, incarnation: int = 0) -> None:
    """Process entry point. Exits non-zero (after telling the launcher) if startup fails.
    ``incarnation``: 0, then one more per restart (the launcher's supervisor passes it)."""
    try:
        from setproctitle import setproctitle

        setproctitle("engine-frontend")
    except ImportError:
        pass
    logging.basicConfig(level=cfg.launch.log_level,
                        format="%(asctime)s %(levelname)s frontend %(name)s: %(message)s")
    ready = False

    def on_ready(ports: dict[str, int]) -> None:
        nonlocal ready
        ipc.notify_launcher(run_dir, ProcessReady(name="frontend", info=ports))
        ready = True

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(_serve(cfg, run_dir, on_ready, incarnation))
    except Exception as e:
        log.exception("frontend failed")
        if ready:  # the launcher sees the exit; ProcessFailed is for startup
            sys.exit(1)
        ipc.notify_launcher(run_dir, ProcessFailed(name="frontend",
                                                   message=f"{type(e).__name__}: {e}"))
        sys.exit(1)
