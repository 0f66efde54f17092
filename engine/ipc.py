"""ZeroMQ sockets carrying the typed messages of ``engine.messages``.

The codec lives here and only here: a ``Sender`` encodes a message into one MessagePack
frame, a ``Receiver`` decodes and validates one frame into the channel's message union.
Addresses are ``ipc://`` paths in the engine's run directory on one machine. Under torchrun
(``engine/torchrun.py``) the pool's worker socket and the launcher's inbox also listen on
TCP, on ports chosen when they bind, and workers on other ranks dial ``tcp://host:port``.

Security. The ``ipc://`` sockets are files in the run directory, which ``make_run_dir``
creates mode 0700: only the engine's user reaches them. Every TCP socket of the engine's own
processes is ZeroMQ CURVE (RFC 26: authenticated, encrypted), and ``make_socket`` refuses a
``tcp://`` address without keys. The keys (``CurveKeys``) are made per launch by torchrun's
rank 0 and broadcast to the other ranks; they never touch disk or a log. A TCP listener
(``bind_tcp``) is a CURVE server whose ZAP handler (pyzmq's ``ThreadAuthenticator``, one per
ZeroMQ context, with an in-memory allow list) accepts exactly the launch's client public key:
a peer must hold the server's public key to complete the handshake and the client secret
key to be let in. A rogue peer (plain, or CURVE with another key) is dropped at the
handshake; nothing it sends is delivered. Socket options are taken at bind time, so the
same socket's ``ipc://`` endpoint, bound before, stays plain. Not covered: the KV events
publisher (``engine.kv_events``), which serves external routers as vLLM's does, in plain
ZeroMQ.

Topology of one pool (``P`` = pool index, files under the run directory):

    pool-P-in.sock       PULL  bound by the pool      <- frontend PUSH (FrontendToPool)
    pool-P-out.sock      PUSH  bound by the pool      -> frontend PULL (PoolToFrontend)
    pool-P-workers.sock  ROUTER bound by the pool     <-> worker DEALER, identity = worker id
    pool-P-ctl.sock      PULL  bound by the pool      <- launcher PUSH (LauncherToPool)
    launcher.sock        PULL  bound by the launcher  <- every process (ToLauncher)
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec
import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator

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
LAUNCHER_TO_FRONTEND: Codec[m.LauncherToFrontend] = Codec(m.LauncherToFrontend)


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


def frontend_control_address(run_dir: str | Path) -> str:
    """Launcher -> frontend (``NotServing``): the frontend binds, the launcher connects."""
    return f"ipc://{Path(run_dir)}/frontend-ctl.sock"


def make_run_dir() -> str:
    """A fresh run directory for the ``ipc://`` sockets, mode 0700 (checked, not assumed:
    the sockets are as private as this directory)."""
    path = tempfile.mkdtemp(prefix="engine-")
    os.chmod(path, 0o700)
    return path


class CurveError(RuntimeError):
    pass


def require_curve() -> None:
    """Fail clearly when this libzmq cannot do CURVE (built without libsodium/tweetnacl):
    the engine never falls back to plain TCP."""
    if not zmq.has("curve"):
        raise CurveError(f"libzmq {zmq.zmq_version()} (pyzmq {zmq.__version__}) was built "
                         "without CURVE; the engine's TCP sockets (torchrun) require it: "
                         "install a pyzmq wheel with its bundled libzmq, or libzmq with "
                         "libsodium")


@dataclass(frozen=True)
class CurveKeys:
    """One launch's CURVE keys (Z85-encoded): the pool's and the launcher's TCP listeners
    are servers with ``server_secret``; every worker dials as the one client key pair.
    Peers get ``for_peers()``, without the server's secret. Never logged: the repr hides
    the secrets."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes = field(repr=False)
    server_secret: bytes = field(default=b"", repr=False)

    @classmethod
    def generate(cls) -> CurveKeys:
        require_curve()
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, client_public, client_secret, server_secret)

    def for_peers(self) -> CurveKeys:
        return CurveKeys(self.server_public, self.client_public, self.client_secret)


#: The ZAP domain of the engine's CURVE listeners.
ZAP_DOMAIN = "engine"
_zap_log = logging.getLogger("engine.zap")
_zap_log.setLevel(logging.WARNING)  # pyzmq logs client keys at DEBUG: never emit those
_authenticators: weakref.WeakKeyDictionary[zmq.Context[Any], ThreadAuthenticator] = (
    weakref.WeakKeyDictionary())
_auth_lock = threading.Lock()


class _AllowedKeys:
    """``ThreadAuthenticator``'s credentials provider: the launch's client key, in memory."""

    def __init__(self, allowed: frozenset[bytes]) -> None:
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        return domain == ZAP_DOMAIN and key in self.allowed


def _authenticator(ctx: zmq.Context[Any], keys: CurveKeys) -> None:
    """Start the ZAP handler of ``ctx`` (once per context): it admits only
    ``keys.client_public``."""
    with _auth_lock:
        if ctx in _authenticators:
            return
        auth = ThreadAuthenticator(zmq.Context.shadow(ctx.underlying), log=_zap_log)
        auth.start()
        auth.configure_curve_callback(ZAP_DOMAIN, _AllowedKeys(frozenset({keys.client_public})))
        _authenticators[ctx] = auth


def destroy(ctx: zmq.Context[Any], linger: int = 0) -> None:
    """Stop ``ctx``'s ZAP handler, if it has one, then destroy the context (use this, not
    ``ctx.destroy``, for a context with a TCP listener)."""
    with _auth_lock:
        auth = _authenticators.pop(ctx, None)
    if auth is not None:
        auth.stop()
    ctx.destroy(linger=linger)


def make_socket(ctx: zmq.Context[Any], kind: int, addr: str, *, bind: bool,
                identity: bytes | None = None, curve: CurveKeys | None = None) -> zmq.Socket[Any]:
    """A socket with the options every engine socket wants: no linger on close (shutdown
    never blocks on undelivered frames), unbounded high-water marks (the scheduler paces
    traffic, ZMQ must never drop or block it). A ``tcp://`` address needs ``curve``: a
    connecting socket becomes the launch's CURVE client (binding on TCP: ``bind_tcp``);
    ``curve`` does not apply to ``ipc://`` addresses."""
    if addr.startswith("tcp://") and (curve is None or bind):
        raise CurveError(f"{addr}: the engine's TCP sockets are CURVE only "
                         "(connect with keys; listen with bind_tcp)")
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
    if curve is not None and addr.startswith("tcp://"):  # ipc:// stays plain (run dir 0700)
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.client_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve.client_secret)
    if bind:
        sock.bind(addr)
    else:
        sock.connect(addr)
    return sock


def worker_identity(worker_id: int) -> bytes:
    return f"w{worker_id}".encode()


def bind_tcp(sock: zmq.Socket[Any], host: str, curve: CurveKeys) -> int:
    """Bind ``sock`` also on TCP at ``host`` (``0.0.0.0``: every interface), on a free port,
    which is returned: as a CURVE server that admits only the launch's client key (the
    endpoints ``sock`` bound before keep their mechanism). Close its context with
    ``destroy``."""
    if not curve.server_secret:
        raise CurveError("a TCP listener needs the server's secret key (rank 0's keys)")
    _authenticator(sock.context, curve)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.server_secret)
    return int(sock.bind_to_random_port(f"tcp://{host}"))


def workers_ready_name(pool_index: int) -> str:
    """The ``ProcessReady`` name a pool says once every worker of its config has registered
    with it (the launcher's ready line waits for it: until then health is not ok)."""
    return f"pool-{pool_index}-workers"


def notify_launcher(run_dir_or_address: str | Path, msg: m.ToLauncher,
                    curve: CurveKeys | None = None) -> None:
    """Send one message to the launcher (ready or failed) from any process: given the run
    directory on the launcher's machine, or the launcher's ``tcp://`` address (with the
    launch's keys) from another."""
    addr = str(run_dir_or_address)
    if not addr.startswith("tcp://"):
        addr = launcher_address(addr)
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = make_socket(ctx, zmq.PUSH, addr, bind=False, curve=curve)
    sock.setsockopt(zmq.LINGER, 2000)  # let this one frame out before close
    sock.send(encode(msg))
    sock.close()
