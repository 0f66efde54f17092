"""The wire's security (engine.ipc): a TCP listener made by ``bind_tcp`` is a CURVE server
that delivers what the launch's client sends and nothing from anyone else (a plain ZeroMQ
peer, a CURVE peer with another client key, one with the wrong server key); the same
socket's ``ipc://`` endpoint stays plain; plain TCP cannot be made by accident; keys stay out
of reprs; the run directory is 0700; no CURVE in libzmq means a clear refusal under torchrun.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from engine import ipc
from engine import messages as m
from engine.topology import Topology

QUIET_MS = 1500  # how long a rogue's frames are given to (not) arrive


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    c: zmq.Context[Any] = zmq.Context()
    yield c
    ipc.destroy(c)


def _rogue(ctx: zmq.Context[Any], kind: int, port: int, keys: tuple[bytes, bytes, bytes] | None
           ) -> zmq.Socket[Any]:
    """A socket not made by the engine: plain, or CURVE with (server public, client public,
    client secret) of its choosing."""
    sock: zmq.Socket[Any] = ctx.socket(kind)
    sock.linger = 0
    if keys is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def _send(sock: zmq.Socket[Any], frame: bytes) -> None:
    """Send what a rogue would, a few times, without blocking (no route: dropped here)."""
    for _ in range(3):
        with contextlib.suppress(zmq.Again):
            sock.send(frame, zmq.NOBLOCK)


def handshake(sock: zmq.Socket[Any], timeout_s: float = 5.0) -> str:
    """The outcome of ``sock``'s first handshake, from its monitor: ``ok``, ``auth`` (ZAP
    said no), ``protocol`` (the mechanisms or keys do not match) or ``dropped``."""
    mon = sock.get_monitor_socket()
    try:
        deadline = time.monotonic() + timeout_s
        while mon.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            event = recv_monitor_message(mon)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return "ok"
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return "auth"
            if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                         zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                return "protocol"
            if event == zmq.EVENT_DISCONNECTED:
                return "dropped"
        return "none"
    finally:
        sock.disable_monitor()
        mon.close(linger=0)


def _rogues(keys: ipc.CurveKeys) -> dict[str, tuple[bytes, bytes, bytes] | None]:
    other_public, other_secret = zmq.curve_keypair()
    return {
        "plain": None,
        "another client key": (keys.server_public, other_public, other_secret),
        "the wrong server key": (other_public, keys.client_public, keys.client_secret),
    }


def test_curve_router_delivers_the_launch_client_and_nothing_from_rogues(ctx, tmp_path):
    """The pool's worker socket: a ROUTER bound on ipc:// then ``bind_tcp``."""
    keys = ipc.CurveKeys.generate()
    router = ipc.make_socket(ctx, zmq.ROUTER, f"ipc://{tmp_path}/w.sock", bind=True)
    port = ipc.bind_tcp(router, "127.0.0.1", keys)
    for name, rogue_keys in _rogues(keys).items():
        rogue = _rogue(ctx, zmq.DEALER, port, rogue_keys)
        rogue.setsockopt(zmq.IDENTITY, ipc.worker_identity(0))  # a worker's identity
        _send(rogue, b"before the handshake")  # queued while it connects
        outcome = handshake(rogue)
        assert outcome != "ok", f"{name}: the handshake succeeded"
        if name == "another client key":
            assert outcome == "auth", "the ZAP handler must be the one saying no"
        _send(rogue, ipc.encode(m.Shutdown()))
        assert not router.poll(QUIET_MS), f"{name}: a frame was delivered"
        rogue.close(linger=0)

    worker = ipc.make_socket(ctx, zmq.DEALER, f"tcp://127.0.0.1:{port}", bind=False,
                             identity=ipc.worker_identity(3), curve=keys.for_peers())
    assert handshake(worker) == "ok"
    worker.send(b"hello")
    assert router.poll(5000)
    assert router.recv_multipart() == [ipc.worker_identity(3), b"hello"]
    router.send_multipart([ipc.worker_identity(3), b"plan"])  # and back, encrypted both ways
    assert worker.poll(5000) and worker.recv() == b"plan"

    local = ipc.make_socket(ctx, zmq.DEALER, f"ipc://{tmp_path}/w.sock", bind=False,
                            identity=ipc.worker_identity(4))
    local.send(b"local")  # the ipc:// endpoint, bound before, stays plain
    assert router.poll(5000)
    assert router.recv_multipart() == [ipc.worker_identity(4), b"local"]


def test_curve_inbox_takes_notify_launcher_with_keys_only(ctx, tmp_path):
    """The launcher's inbox: a PULL, as ``Launcher`` binds it; ``notify_launcher`` over TCP
    needs the keys."""
    keys = ipc.CurveKeys.generate()
    inbox = ipc.make_socket(ctx, zmq.PULL, ipc.launcher_address(tmp_path), bind=True)
    port = ipc.bind_tcp(inbox, "127.0.0.1", keys)
    address = f"tcp://127.0.0.1:{port}"
    with pytest.raises(ipc.CurveError, match="CURVE only"):
        ipc.notify_launcher(address, m.ProcessReady(name="worker-0-1"))
    for name, rogue_keys in _rogues(keys).items():
        rogue = _rogue(ctx, zmq.PUSH, port, rogue_keys)
        _send(rogue, ipc.encode(m.ProcessFailed(name="pool-0", message="rogue")))
        assert handshake(rogue) != "ok", f"{name}: the handshake succeeded"
        _send(rogue, ipc.encode(m.ProcessFailed(name="pool-0", message="rogue")))
        assert not inbox.poll(QUIET_MS), f"{name}: a frame was delivered"
        rogue.close(linger=0)
    ipc.notify_launcher(address, m.ProcessReady(name="worker-0-1"), keys.for_peers())
    assert inbox.poll(5000)
    assert ipc.TO_LAUNCHER.decode(inbox.recv()) == m.ProcessReady(name="worker-0-1")
    ipc.notify_launcher(tmp_path, m.ProcessReady(name="frontend"), keys.for_peers())  # plain
    assert inbox.poll(5000)
    assert ipc.TO_LAUNCHER.decode(inbox.recv()) == m.ProcessReady(name="frontend")


def test_plain_tcp_cannot_be_made(ctx):
    keys = ipc.CurveKeys.generate()
    with pytest.raises(ipc.CurveError):
        ipc.make_socket(ctx, zmq.DEALER, "tcp://127.0.0.1:5", bind=False)
    with pytest.raises(ipc.CurveError):
        ipc.make_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", bind=True, curve=keys)
    sock = ctx.socket(zmq.ROUTER)
    with pytest.raises(ipc.CurveError, match="server's secret"):
        ipc.bind_tcp(sock, "127.0.0.1", keys.for_peers())  # what the other ranks hold
    sock.close()
    with pytest.raises(ValueError, match="CURVE keys"):
        Topology(1, 1, 1, (), ("worker-0-0",), listen_host="0.0.0.0")


def test_keys_are_per_launch_and_secrets_stay_out_of_reprs():
    keys = ipc.CurveKeys.generate()
    other = ipc.CurveKeys.generate()
    assert keys.server_public != other.server_public and keys.client_secret != other.client_secret
    assert keys.server_public != keys.client_public
    peers = keys.for_peers()
    assert peers.server_secret == b"" and peers.client_secret == keys.client_secret
    topo = Topology(1, 1, 1, (), ("worker-0-0",), listen_host="0.0.0.0", curve=keys)
    for text in (repr(keys), repr(peers), repr(topo)):
        assert keys.server_secret.decode() not in text
        assert keys.client_secret.decode() not in text


def test_destroy_stops_the_authenticator():
    before = threading.active_count()
    c: zmq.Context[Any] = zmq.Context()
    sock = ipc.make_socket(c, zmq.PULL, "inproc://x", bind=True)
    ipc.bind_tcp(sock, "127.0.0.1", ipc.CurveKeys.generate())
    assert threading.active_count() > before  # the ZAP handler's thread
    start = time.monotonic()
    ipc.destroy(c)
    assert time.monotonic() - start < 3 and c.closed
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_run_dir_is_private():
    old = os.umask(0)  # even a permissive umask leaves it 0700
    try:
        path = ipc.make_run_dir()
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        assert os.stat(path).st_uid == os.getuid()
    finally:
        os.rmdir(path)


def test_torchrun_refuses_to_start_without_curve(monkeypatch, capsys):
    from engine import torchrun

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    real_has = zmq.has
    monkeypatch.setattr(zmq, "has", lambda cap: cap != "curve" and real_has(cap))
    with pytest.raises(ipc.CurveError):
        ipc.CurveKeys.generate()
    assert torchrun.main([]) == 2
    err = capsys.readouterr().err
    assert "built without CURVE" in err and "require it" in err
