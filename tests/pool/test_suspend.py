"""Pausing a worker process while a critical step runs on a worker sharing its cores
(engine/pool/suspend.py): signals through pidfds, one stop per worker whatever the number of
holders, continued when the last holder's step ends, nothing signalled once it is gone."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import zmq
from fakes import (
    FakeWorker,
    make_request,
    pool_peers,
    process_state,
    reference_output,
    wait_stopped,
)

from engine import ipc
from engine import messages as m
from engine.cli import config_from_dict
from engine.pool.service import PoolService
from engine.pool.suspend import Suspender, can_suspend

pytestmark = pytest.mark.skipif(not can_suspend(), reason="pidfds are Linux-only")


@pytest.fixture
def spinner():
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_worker_stays_paused_until_the_last_holder_step_ends(spinner) -> None:
    s = Suspender(enabled=True)
    s.register(0, spinner.pid)
    s.suspend(1, [0])  # worker 1's critical step holds worker 0
    wait_stopped(spinner.pid, stopped=True)
    s.suspend(2, [0, 2])  # another holder: no second stop; a holder never holds itself
    assert s.num_suspended == 2 and not s.is_suspended(2)
    s.resume(1)
    time.sleep(0.05)
    assert process_state(spinner.pid) == "T"  # worker 2's step still runs
    s.resume(2)
    wait_stopped(spinner.pid, stopped=False)
    s.suspend(1, [0])
    wait_stopped(spinner.pid, stopped=True)
    s.forget(1)  # the holder died: what it held goes on
    wait_stopped(spinner.pid, stopped=False)
    s.suspend(1, [0])
    wait_stopped(spinner.pid, stopped=True)
    s.close()  # the pool stops: nothing left paused
    wait_stopped(spinner.pid, stopped=False)


def test_nothing_is_paused_that_is_gone_unknown_or_disabled(spinner) -> None:
    off = Suspender(enabled=False)
    off.register(0, spinner.pid)
    off.suspend(1, [0])
    assert off.num_suspended == 0 and process_state(spinner.pid) != "T"
    s = Suspender(enabled=True)
    s.register(0, 0)  # a remote or tensor-parallel worker: no pid
    s.suspend(1, [0])
    assert s.num_suspended == 0
    s.register(0, spinner.pid)
    spinner.kill()
    spinner.wait()
    s.suspend(1, [0])  # died before its WorkerDied came: its pidfd names the dead process
    assert s.num_suspended == 0 and not s.is_suspended(0)
    s.close()


def slow_worker_thread(run_dir, worker_id, pid, step_s, stop: threading.Event):
    """A fake worker whose every step takes ``step_s``, registered as process ``pid``."""
    ctx = zmq.Context.instance()
    sock = ipc.make_socket(ctx, zmq.DEALER, ipc.pool_addresses(run_dir, 0).workers,
                           bind=False, identity=ipc.worker_identity(worker_id))
    worker = FakeWorker(worker_id, 32, 4)
    sock.send(ipc.encode(m.WorkerReady(worker_id=worker_id, num_blocks=32, block_size=4,
                                       pid=pid)))
    while not stop.is_set():
        if sock.poll(20):
            msg = ipc.POOL_TO_WORKER.decode(sock.recv())
            if isinstance(msg, m.StepPlan):
                time.sleep(step_s)
                sock.send(ipc.encode(worker.step(msg)))
    sock.close()


def test_the_pool_pauses_a_sheddable_step_while_a_critical_prompt_runs(
        tmp_path, model_dir, spinner) -> None:
    """Two workers sharing cores, one reserved: worker 0 decodes a sheddable request in slow
    steps; a critical request's prompt step on worker 1 pauses worker 0's process (a stand-in
    here, the spinner) until its result is in. Every token is the reference's, and nothing
    is left paused."""
    cfg = config_from_dict({"model": [str(model_dir)], "block_size": 4, "workers": 2,
                            "policy": "priority", "workers_share_cores": "yes",
                            "reserved_workers": 1})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    service = PoolService(cfg, 0, str(run_dir))
    pool = threading.Thread(target=service.run, daemon=True)
    pool.start()
    stop = threading.Event()
    threads = [threading.Thread(target=slow_worker_thread, daemon=True,
                                args=(run_dir, w, pid, 0.15, stop))
               for w, pid in ((0, spinner.pid), (1, 0))]
    for t in threads:
        t.start()
    push, pull, control = pool_peers(run_dir, service, 2, timeout_s=20)
    deadline = time.time() + 20
    reqs = [make_request("crit0", prompt_len=6, max_tokens=2, seed=1, priority=0),
            make_request("low", prompt_len=6, max_tokens=12, seed=2, priority=-1),
            make_request("crit", prompt_len=6, max_tokens=2, seed=3, priority=0)]
    tokens: dict[str, list[int]] = {}
    finished: set[str] = set()
    paused_seen = False
    push.send(ipc.encode(m.AddRequest(request=reqs[0])))  # reserves worker 1
    push.send(ipc.encode(m.AddRequest(request=reqs[1])))
    while len(finished) < len(reqs) and time.time() < deadline:
        if "low" in tokens and len(tokens["low"]) == 3 and "crit" not in tokens:
            push.send(ipc.encode(m.AddRequest(request=reqs[2])))  # low's decodes in flight
            tokens["crit"] = []
        paused_seen = paused_seen or process_state(spinner.pid) == "T"
        if not pull.poll(5):
            continue
        for o in ipc.POOL_TO_FRONTEND.decode(pull.recv()).outputs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason:
                finished.add(o.request_id)
    assert service.scheduler.stats().reserved_worker_ids == [1]
    control.send(ipc.encode(m.Shutdown()))
    pool.join(5)
    stop.set()
    assert paused_seen and service.suspender.num_suspended >= 1
    wait_stopped(spinner.pid, stopped=False)
    for r in reqs:
        assert tokens[r.request_id] == reference_output(r), r.request_id
    service.close()
    for s in (push, pull, control):
        s.close()
