"""Races between a worker's death, its restart and the pool, each interleaving scripted.

Every incarnation of a worker slot dials the pool under the same ZMQ identity, and the pool's
ROUTER hands the identity over to the newest connection: from the moment a restarted worker
connects, what the pool sends to that worker reaches the new process, whatever the pool knows
yet. The launcher's ``WorkerDied`` comes on another socket, and the dead incarnation's last
messages may still be queued on the pool's side, so the pool may hear, in any order: the old
incarnation's results, ``WorkerDied(old)``, ``WorkerReady(new)`` (and even the old one's
hello, if it died right after saying it).

These tests drive ``PoolService``'s handlers in a chosen order, with no thread and no sleep:
one DEALER socket plays whichever process holds the worker's identity (the test says which
incarnation it is by the ``FakeWorker`` it hands the plans to), worker messages go through
the real ROUTER, the launcher's go to the control handler directly.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import zmq
from fakes import FakeWorker, make_request, reference_output

from engine import ipc
from engine import messages as m
from engine.cli import config_from_dict
from engine.pool.service import PoolService
from engine.worker.process import serve

W = 1  # the worker slot under test
BLOCKS = 32


class Wire:
    """A pool service and the socket that holds worker ``W``'s identity."""

    def __init__(self, service: PoolService, run_dir: str) -> None:
        self.service = service
        self.peer = ipc.make_socket(zmq.Context.instance(), zmq.DEALER,
                                    ipc.pool_addresses(run_dir, 0).workers, bind=False,
                                    identity=ipc.worker_identity(W))
        self.tokens: dict[str, list[int]] = {}
        self.finished: dict[str, str] = {}

    def send(self, msg: m.WorkerToPool) -> None:
        """``msg`` from the process holding the identity, handled by the pool."""
        self.peer.send(ipc.encode(msg))
        assert self.service.workers.poll(5000), "the pool never received it"
        self.service._drain_workers()

    def ready(self, incarnation: int) -> None:
        self.send(m.WorkerReady(worker_id=W, num_blocks=BLOCKS, block_size=4,
                                incarnation=incarnation))

    def died(self, incarnation: int) -> None:
        self.service._on_control(m.WorkerDied(worker_id=W, incarnation=incarnation))

    def add(self, *requests: m.EngineRequest) -> None:
        for r in requests:
            self.service._on_request(m.AddRequest(request=r))

    def plan(self) -> m.StepPlan:
        """The pool's next step for the worker, as the process holding the identity gets it."""
        self.service.core.step(0.0)
        while True:  # after the pool's greeting, sent once, before its first plan
            assert self.peer.poll(5000), "no plan sent"
            msg = ipc.POOL_TO_WORKER.decode(self.peer.recv())
            if not isinstance(msg, m.PoolHello):
                break
        assert isinstance(msg, m.StepPlan)
        return msg

    def collect(self) -> None:
        for o in self.service.core.take_outputs():
            self.tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason:
                self.finished[o.request_id] = o.finish_reason

    def run(self, worker: FakeWorker, requests: list[m.EngineRequest]) -> None:
        """Step ``worker`` until every request finished; each plan must be for it."""
        for _ in range(200):
            self.collect()
            if all(r.request_id in self.finished for r in requests):
                return
            plan = self.plan()
            assert plan.incarnation == worker.incarnation
            result = worker.serve(plan)
            assert result is not None
            self.send(result)
        raise AssertionError("did not finish")

    @property
    def worker(self) -> Any:
        return self.service.scheduler.workers.get(W)


@pytest.fixture
def wire(tmp_path, model_dir):
    cfg = config_from_dict({"model": [str(model_dir)], "block_size": 4})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    service = PoolService(cfg, 0, str(run_dir), clock=lambda: 0.0)
    w = Wire(service, str(run_dir))
    yield w
    w.peer.close()
    service.close()


def requests(n: int = 2, max_tokens: int = 6) -> list[m.EngineRequest]:
    return [make_request(f"r{i}", prompt_len=6, max_tokens=max_tokens, seed=i) for i in range(n)]


def assert_outputs_exact(wire: Wire, reqs: list[m.EngineRequest]) -> None:
    """Every request finished once, with the uninterrupted greedy output: no token lost or
    repeated across the restart."""
    wire.collect()
    for r in reqs:
        assert wire.finished.get(r.request_id) == "length", r.request_id
        assert wire.tokens[r.request_id] == reference_output(r), r.request_id


def test_a_plan_sent_to_the_dead_incarnation_is_dropped_by_its_successor(wire):
    """The failure seen once in test_pool_serves_requests_and_survives_a_worker_loss: the
    pool, not yet told of incarnation 0's death, sends it the next decode step (deltas of
    requests it holds), and incarnation 1, which took the identity over, receives it."""
    old = FakeWorker(W, BLOCKS, 4, incarnation=0)
    wire.ready(0)
    reqs = requests()
    wire.add(*reqs)
    first = wire.plan()
    wire.send(old.step(first))
    stale = wire.plan()
    assert stale.cached_requests and stale.incarnation == 0

    new = FakeWorker(W, BLOCKS, 4, incarnation=1)  # incarnation 0 died; 1 holds the identity
    assert new.serve(stale) is None and new.dropped == [stale]
    wire.ready(1)  # the new incarnation's hello comes before the launcher's WorkerDied
    plan = wire.plan()
    assert plan.incarnation == 1
    assert {r.request_id for r in plan.new_requests} == {r.request_id for r in reqs}
    assert not plan.cached_requests
    result = new.serve(plan)
    assert result is not None and result.incarnation == 1
    wire.died(0)  # late: the worker it names is already replaced
    assert wire.worker is not None and wire.worker.in_flight == plan
    wire.send(result)
    wire.run(new, reqs)
    assert_outputs_exact(wire, reqs)


@pytest.mark.parametrize("order", ["died-then-ready", "ready-then-died"])
def test_death_and_restart_are_handled_in_either_order(wire, order):
    """WorkerDied(0) and WorkerReady(1) arrive on different sockets: either order re-places
    the requests once, onto the new incarnation, with no delta of the old one."""
    old = FakeWorker(W, BLOCKS, 4, incarnation=0)
    wire.ready(0)
    reqs = requests()
    wire.add(*reqs)
    wire.send(old.step(wire.plan()))
    in_flight = wire.plan()  # incarnation 0 dies running this step
    for event in order.split("-then-"):
        if event == "died":
            wire.died(0)
        else:
            wire.ready(1)
    new = FakeWorker(W, BLOCKS, 4, incarnation=1)
    plan = wire.plan()
    assert plan.incarnation == 1 and not plan.cached_requests
    assert sorted(r.request_id for r in plan.new_requests) == ["r0", "r1"]
    assert all(r.num_computed_tokens == 0 for r in plan.new_requests)
    # The dead incarnation's answer to its last step, and an error it reported, come late.
    wire.send(old.step(in_flight))
    wire.send(m.WorkerError(step_id=in_flight.step_id, worker_id=W, incarnation=0,
                            message="stale"))
    wire.collect()
    assert not wire.finished, "a stale message of the dead incarnation finished a request"
    assert wire.worker.in_flight == plan
    result = new.serve(plan)
    assert result is not None
    wire.send(result)
    wire.run(new, reqs)
    assert_outputs_exact(wire, reqs)


def test_an_error_of_the_dead_incarnation_fails_nothing_of_the_new_one(wire):
    """A WorkerError that the dead incarnation sent before dying (or that the new one sends
    for a plan meant for the old one) reaches the pool after the new incarnation got a step."""
    wire.ready(0)
    reqs = requests()
    wire.add(*reqs)
    doomed = wire.plan()
    wire.ready(1)
    plan = wire.plan()
    wire.send(m.WorkerError(step_id=doomed.step_id, worker_id=W, incarnation=0, message="boom"))
    wire.send(m.WorkerError(step_id=plan.step_id, worker_id=W, incarnation=0, message="boom"))
    wire.collect()
    assert not wire.finished
    new = FakeWorker(W, BLOCKS, 4, incarnation=1)
    result = new.serve(plan)
    assert result is not None
    wire.send(result)
    wire.run(new, reqs)
    assert_outputs_exact(wire, reqs)


def test_the_hello_of_an_incarnation_already_reported_dead_is_ignored(wire):
    """Incarnation 0 says hello and dies at once: the launcher's WorkerDied(0) is handled
    first. The pool must not schedule the dead incarnation (its plans would go to the next
    one, or nowhere) but wait for incarnation 1's hello."""
    reqs = requests()
    wire.add(*reqs)
    wire.died(0)
    wire.ready(0)
    assert wire.worker is None
    assert wire.service.scheduler.stats().num_waiting == len(reqs)
    wire.ready(1)
    new = FakeWorker(W, BLOCKS, 4, incarnation=1)
    wire.run(new, reqs)
    assert_outputs_exact(wire, reqs)


def test_a_late_hello_of_an_older_incarnation_changes_nothing(wire):
    """Incarnation 0's hello (it died right after sending it) is read after incarnation 1's,
    and its WorkerDied after that: incarnation 1 keeps its requests and its step in flight.
    So does a repeated hello of incarnation 1."""
    wire.ready(1)
    reqs = requests()
    wire.add(*reqs)
    plan = wire.plan()
    wire.ready(0)
    wire.ready(1)
    wire.died(0)
    assert wire.worker is not None and wire.worker.in_flight == plan
    new = FakeWorker(W, BLOCKS, 4, incarnation=1)
    result = new.serve(plan)
    assert result is not None
    wire.send(result)
    wire.run(new, reqs)
    assert_outputs_exact(wire, reqs)
    assert wire.service.scheduler.num_preemptions == 0


def test_worker_process_drops_plans_of_another_incarnation(tmp_path):
    """``engine.worker.process.serve``: a plan addressed to another incarnation is neither
    run nor answered; the next plan for this one is, and its result and errors carry it."""
    ctx: zmq.Context[Any] = zmq.Context()
    addr = f"ipc://{tmp_path}/w.sock"
    router = ipc.make_socket(ctx, zmq.ROUTER, addr, bind=True)
    dealer = ipc.make_socket(ctx, zmq.DEALER, addr, bind=False, identity=ipc.worker_identity(W))
    try:
        check_worker_serve(router, dealer)
    finally:
        ctx.destroy(linger=0)


def check_worker_serve(router: zmq.Socket[Any], dealer: zmq.Socket[Any]) -> None:
    runner = FakeWorker(W, BLOCKS, 4, incarnation=1)
    thread = threading.Thread(target=serve, args=(runner, dealer, W, 1), daemon=True)
    dealer.send(b"hello")  # so the router knows the route
    assert router.poll(5000)
    router.recv_multipart()
    thread.start()
    assert isinstance(ipc.WORKER_TO_POOL.decode(router.recv_multipart()[1]), m.WorkerReady)

    def to_worker(msg: m.PoolToWorker) -> None:
        router.send_multipart([ipc.worker_identity(W), ipc.encode(msg)])

    def from_worker() -> m.WorkerToPool:
        assert router.poll(5000), "no answer"
        return ipc.WORKER_TO_POOL.decode(router.recv_multipart()[1])

    req = make_request("r0", prompt_len=6, max_tokens=4)
    new = m.NewRequestData(request_id="r0", token_ids=list(req.prompt_token_ids),
                           sampling=req.sampling, block_ids=[0, 1], num_computed_tokens=0,
                           num_scheduled_tokens=6)
    # A decode step of the dead incarnation 0, for a request this process never saw.
    to_worker(m.StepPlan(step_id=7, worker_id=W, incarnation=0,
                         cached_requests=[m.CachedRequestData(request_id="rX",
                                                              num_scheduled_tokens=1)]))
    to_worker(m.StepPlan(step_id=8, worker_id=W, incarnation=1, new_requests=[new]))
    first = from_worker()  # messages keep their order: nothing came for step 7
    assert isinstance(first, m.StepResult)
    assert (first.step_id, first.incarnation, first.request_ids) == (8, 1, ["r0"])
    assert runner.reqs.keys() == {"r0"}  # the stale step never reached the runner
    # A step that fails on the worker is reported with the incarnation.
    to_worker(m.StepPlan(step_id=9, worker_id=W, incarnation=1, new_requests=[new]))
    error = from_worker()
    assert isinstance(error, m.WorkerError)
    assert (error.step_id, error.incarnation) == (9, 1)
    to_worker(m.Shutdown())
    thread.join(5)
    assert not thread.is_alive()
