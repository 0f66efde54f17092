"""The pool when its frontend dies (engine/pool/service.py, "Frontend death"): its loop never
blocks on a missing frontend, the launcher's ``FrontendDied`` aborts exactly the dead
incarnation's requests and frees their KV, a late ``AddRequest`` of the dead incarnation is
dropped, and the restarted frontend's requests run to the right output whatever the order
of the two sockets. Real ZeroMQ sockets, a fake worker in a thread (slowed down so that
requests are still running when the frontend goes)."""

from __future__ import annotations

import threading
import time

import zmq
from fakes import FakeWorker, make_request, reference_output

from engine import ipc
from engine import messages as m
from engine.cli import config_from_dict
from engine.pool.service import PoolService

NUM_BLOCKS = 256
STEP_S = 0.01  # the fake worker's step time


class SlowWorker:
    """One fake worker in a thread; ``steps`` counts the plans it ran."""

    def __init__(self, run_dir) -> None:
        self.steps = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(run_dir,), daemon=True)
        self.thread.start()

    def _run(self, run_dir) -> None:
        sock = ipc.make_socket(zmq.Context.instance(), zmq.DEALER,
                               ipc.pool_addresses(run_dir, 0).workers, bind=False,
                               identity=ipc.worker_identity(0))
        worker = FakeWorker(0, NUM_BLOCKS, 4)
        sock.send(ipc.encode(m.WorkerReady(worker_id=0, num_blocks=NUM_BLOCKS, block_size=4)))
        while not self.stop.is_set():
            if sock.poll(20):
                msg = ipc.POOL_TO_WORKER.decode(sock.recv())
                if isinstance(msg, m.StepPlan) and (result := worker.serve(msg)) is not None:
                    time.sleep(STEP_S)
                    self.steps += 1
                    sock.send(ipc.encode(result))
        sock.close()


class Frontend:
    """The frontend's two sockets to the pool, stamped with ``incarnation``."""

    def __init__(self, run_dir, incarnation: int) -> None:
        ctx = zmq.Context.instance()
        addrs = ipc.pool_addresses(run_dir, 0)
        self.incarnation = incarnation
        self.push = ipc.make_socket(ctx, zmq.PUSH, addrs.requests, bind=False)
        self.pull = ipc.make_socket(ctx, zmq.PULL, addrs.outputs, bind=False)
        self.tokens: dict[str, list[int]] = {}
        self.finished: dict[str, str] = {}
        self.stats: m.PoolStats | None = None

    def add(self, req) -> None:
        self.push.send(ipc.encode(m.AddRequest(request=req,
                                               frontend_incarnation=self.incarnation)))

    def read(self, until, timeout: float = 10.0) -> None:
        deadline = time.time() + timeout
        while not until() and time.time() < deadline:
            if self.pull.poll(50):
                msg = ipc.POOL_TO_FRONTEND.decode(self.pull.recv())
                for o in msg.outputs:
                    self.tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
                    if o.finish_reason:
                        self.finished[o.request_id] = o.finish_reason
                self.stats = msg.stats
        assert until(), "timed out"

    def close(self) -> None:
        self.push.close()
        self.pull.close()


def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.01)
    assert cond(), "timed out"


def test_frontend_death_aborts_its_requests_and_never_blocks_the_pool(tmp_path, model_dir):
    cfg = config_from_dict({"model": [str(model_dir)], "block_size": 4, "workers": 1})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    service = PoolService(cfg, 0, str(run_dir))
    pool = threading.Thread(target=service.run, daemon=True)
    pool.start()
    worker = SlowWorker(run_dir)
    control = ipc.make_socket(zmq.Context.instance(), zmq.PUSH,
                              ipc.pool_addresses(run_dir, 0).control, bind=False)
    try:
        # No frontend connected yet: the pool's heartbeats find no peer; its loop goes on
        # (a blocking send would stop it before the worker is even registered).
        _wait(lambda: 0 in service.scheduler.workers)
        time.sleep(3 * 0.25)  # several heartbeats dropped
        assert pool.is_alive() and not service.frontend_connected

        old = Frontend(run_dir, incarnation=0)
        old_reqs = [make_request(f"old{i}", prompt_len=6, max_tokens=200, seed=i)
                    for i in range(4)]
        for r in old_reqs:
            old.add(r)
        old.read(lambda: all(len(old.tokens.get(r.request_id, [])) >= 3 for r in old_reqs))
        assert not old.finished
        old.close()  # the frontend dies: its requests run on, their outputs go nowhere
        steps = worker.steps
        _wait(lambda: worker.steps >= steps + 10)  # the pool keeps stepping without a frontend
        assert len(service.scheduler.requests) == len(old_reqs)

        # The restarted frontend may reach the pool before the launcher's FrontendDied does.
        new = Frontend(run_dir, incarnation=1)
        fresh = make_request("new0", prompt_len=6, max_tokens=30, seed=9)
        new.add(fresh)
        _wait(lambda: "new0" in service.scheduler.requests)
        control.send(ipc.encode(m.FrontendDied(incarnation=0)))
        _wait(lambda: set(service.scheduler.requests) <= {"new0"})
        assert service.frontend_dead == 0
        old.push = ipc.make_socket(zmq.Context.instance(), zmq.PUSH,
                                   ipc.pool_addresses(run_dir, 0).requests, bind=False)
        old.add(make_request("late", prompt_len=6, max_tokens=30, seed=5))  # queued by the dead

        new.read(lambda: "new0" in new.finished)
        assert new.finished["new0"] == "length"
        assert new.tokens["new0"] == reference_output(fresh)
        for r in old_reqs:  # none of the dead frontend's requests is finished to the new one
            assert r.request_id not in new.finished
        new.read(lambda: new.stats is not None and new.stats.num_free_blocks == [NUM_BLOCKS])
        assert "late" not in service.scheduler.requests and "late" not in new.tokens
        assert not service.owners
        old.push.close()
        new.close()
    finally:
        control.send(ipc.encode(m.Shutdown()))
        pool.join(5)
        worker.stop.set()
        worker.thread.join(5)
        control.close()
        service.close()
    assert not pool.is_alive()
