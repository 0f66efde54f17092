"""ZeroMQ sockets carrying the typed messages of ``engine.messages``.

The codec lives here and only here: a ``Sender`` encodes a message into one MessagePack
frame, a ``Receiver`` decodes and validates one frame into the channel's message union.
Addresses are ``ipc://`` paths in the engine's run directory on one machine. Under torchrun
(``engine/torchrun.py``) the pool's worker socket and the launcher's inbox also listen on
TCP, on ports chosen when they bind, and workers on other ranks dial ``tcp://host:port``.

Topology of one pool (``P`` = pool index, files under the run directory):

    pool-P-in.sock       PULL  bound by the pool      <- frontend PUSH (FrontendToPool)
    pool-P-out.sock      PUSH  bound by the pool      -> frontend PULL (PoolToFrontend)
    pool-P-workers.sock  ROUTER bound by the pool     <-> worker DEALER, identity = worker id
    pool-P-ctl.sock      PULL  bound by the pool      <- launcher PUSH (LauncherToPool)
    launcher.sock        PULL  bound by the launcher  <- every process (ToLauncher)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec
import zmq
import zmq.asyncio

from engine import messages as m

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


def encode(msg: Any) -> bytes:
    return _encoder.encode(msg)


class Codec(Generic[T]):
    """Decoder for one channel's message union."""

    def __init__(self, type_: Any) -> None:
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(type_)

    def decode(self, frame: bytes | memoryview) -> T:
        return self._decoder.decode(frame)


FRONTEND_TO_POOL: Codec[m.FrontendToPool] = Codec(m.FrontendToPool)
POOL_TO_FRONTEND: Codec[m.PoolToFrontend] = Codec(m.PoolToFrontend)
POOL_TO_WORKER: Codec[m.PoolToWorker] = Codec(m.PoolToWorker)
WORKER_TO_POOL: Codec[m.WorkerToPool] = Codec(m.WorkerToPool)
LAUNCHER_TO_POOL: Codec[m.LauncherToPool] = Codec(m.LauncherToPool)
TO_LAUNCHER: Codec[m.ToLauncher] = Codec(m.ToLauncher)


@dataclass(frozen=True)
class PoolAddresses:
    requests: str  # frontend -> pool
    outputs: str  # pool -> frontend
    workers: str  # pool <-> workers
    control: str  # launcher -> pool


def pool_addresses(run_dir: str | Path, pool_index: int) -> PoolAddresses:
    d = Path(run_dir)
    return PoolAddresses(
        requests=f"ipc://{d}/pool-{pool_index}-in.sock",
        outputs=f"ipc://{d}/pool-{pool_index}-out.sock",
        workers=f"ipc://{d}/pool-{pool_index}-workers.sock",
        control=f"ipc://{d}/pool-{pool_index}-ctl.sock",
    )


def launcher_address(run_dir: str | Path) -> str:
    return f"ipc://{Path(run_dir)}/launcher.sock"


def make_socket(ctx: zmq.Context[Any], kind: int, addr: str, *, bind: bool,
                identity: bytes | None = None) -> zmq.Socket[Any]:
    """A socket with the options every engine socket wants: no linger on close (shutdown
    never blocks on undelivered frames), unbounded high-water marks (the scheduler paces
    traffic, ZMQ must never drop or block it)."""
    sock: zmq.Socket[Any] = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.ROUTER:
        # A restarted worker reconnects under the same identity and takes the route over.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if bind:
        sock.bind(addr)
    else:
        sock.connect(addr)
    return sock


def worker_identity(worker_id: int) -> bytes:
    return f"w{worker_id}".encode()


def bind_tcp(sock: zmq.Socket[Any], host: str) -> int:
    """Bind ``sock`` also on TCP at ``host`` (``0.0.0.0``: every interface), on a free port,
    which is returned."""
    return int(sock.bind_to_random_port(f"tcp://{host}"))


def notify_launcher(run_dir_or_address: str | Path, msg: m.ToLauncher) -> None:
    """Send one message to the launcher (ready or failed) from any process: given the run
    directory on the launcher's machine, or the launcher's ``tcp://`` address from another."""
    addr = str(run_dir_or_address)
    if not addr.startswith("tcp://"):
        addr = launcher_address(addr)
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = make_socket(ctx, zmq.PUSH, addr, bind=False)
    sock.setsockopt(zmq.LINGER, 2000)  # let this one frame out before close
    sock.send(encode(msg))
    sock.close()
