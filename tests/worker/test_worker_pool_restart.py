"""A worker outlives its pool: the real serve loop (engine/worker/process.py) on the shared
native runner, dialing a ROUTER that plays the pool. The pool dies (its socket closes) and a
new one binds the same address; the worker's DEALER reconnects, the new pool greets it, and
the worker drops every request it held (state and grammar matcher) and registers again."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import zmq

from engine import ipc
from engine import messages as m
from engine.worker.process import serve

from .harness import held_request_ids

GREEDY = m.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
CHOICE = m.SamplingParams(temperature=0.0, max_tokens=8, structured=m.StructuredOutput(
    kind="choice", value=json.dumps(["yes", "no"])))


class FakePool:
    """A ROUTER bound where the worker dials, as a pool binds it."""

    def __init__(self, ctx: zmq.Context[Any], addr: str, incarnation: int) -> None:
        self.sock = ipc.make_socket(ctx, zmq.ROUTER, addr, bind=True)
        self.incarnation = incarnation

    def send(self, msg: Any) -> None:
        self.sock.send_multipart([ipc.worker_identity(0), ipc.encode(msg)])

    def recv(self, timeout_s: float = 30.0) -> m.WorkerToPool:
        assert self.sock.poll(int(timeout_s * 1000)), "the worker did not answer"
        _identity, frame = self.sock.recv_multipart()
        return ipc.WORKER_TO_POOL.decode(frame)

    def silent(self, timeout_s: float = 0.3) -> bool:
        return not self.sock.poll(int(timeout_s * 1000))

    def greet(self, timeout_s: float = 10.0) -> None:
        """``PoolHello``, retried until the worker is connected (as the pool does)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sock.send_multipart(
                    [ipc.worker_identity(0),
                     ipc.encode(m.PoolHello(pool_incarnation=self.incarnation))], zmq.NOBLOCK)
                return
            except zmq.ZMQError:
                assert time.monotonic() < deadline, "the worker never connected"
                time.sleep(0.01)


def _new(rid: str, prompt: list[int], block: int, sampling: m.SamplingParams) -> m.NewRequestData:
    return m.NewRequestData(request_id=rid, token_ids=prompt, sampling=sampling,
                            block_ids=[block], num_computed_tokens=0,
                            num_scheduled_tokens=len(prompt))


def _ready(msg: m.WorkerToPool, native_runner) -> None:
    assert isinstance(msg, m.WorkerReady), msg
    assert (msg.worker_id, msg.incarnation) == (0, 3)
    assert (msg.num_blocks, msg.block_size) == (native_runner.num_blocks,
                                                native_runner.block_size)


def test_a_worker_whose_pool_restarts_drops_its_requests_and_registers_again(
        tmp_path, native_runner, prompts) -> None:
    addr = f"ipc://{tmp_path}/pool-0-workers.sock"
    ctx: zmq.Context[Any] = zmq.Context()
    old = FakePool(ctx, addr, incarnation=11)
    dealer = ipc.make_socket(ctx, zmq.DEALER, addr, bind=False, identity=ipc.worker_identity(0))
    worker = threading.Thread(target=serve, args=(native_runner, dealer, 0, 3), daemon=True)
    worker.start()
    new = None
    try:
        _ready(old.recv(), native_runner)  # at start
        old.greet()
        _ready(old.recv(), native_runner)  # it cannot know whether its first reached this pool
        old.greet()
        assert old.silent(), "a second hello of the same pool is answered once only"

        old.send(m.StepPlan(step_id=1, worker_id=0, incarnation=3, new_requests=[
            _new("a", prompts[0], 0, GREEDY), _new("b", prompts[1], 1, CHOICE)]))
        result = old.recv()
        assert isinstance(result, m.StepResult) and result.request_ids == ["a", "b"], result
        assert sorted(held_request_ids(native_runner)) == ["a", "b"]
        assert list(native_runner.grammars.matchers) == ["b"]

        old.sock.close()  # the pool process dies; the launcher starts another on its address
        new = FakePool(ctx, addr, incarnation=12)
        new.greet()
        _ready(new.recv(), native_runner)
        assert held_request_ids(native_runner) == [], "the dead pool's requests are dropped"
        assert native_runner.grammars.matchers == {}

        # The new pool knows nothing of "a": a delta for it fails, and "a" is new again.
        new.send(m.StepPlan(step_id=1, worker_id=0, incarnation=3, cached_requests=[
            m.CachedRequestData(request_id="a", num_scheduled_tokens=1)]))
        error = new.recv()
        assert isinstance(error, m.WorkerError) and "'a'" in error.message, error
        new.send(m.StepPlan(step_id=2, worker_id=0, incarnation=3,
                            new_requests=[_new("a", prompts[2], 5, GREEDY)]))
        again = new.recv()
        assert isinstance(again, m.StepResult) and again.request_ids == ["a"], again
        new.send(m.StepPlan(step_id=3, worker_id=0, incarnation=3, finished_request_ids=["a"]))
        assert isinstance(new.recv(), m.StepResult)
        new.send(m.Shutdown())
        worker.join(10)
        assert not worker.is_alive(), "Shutdown ends the serve loop"
    finally:
        if worker.is_alive():  # leave the shared runner as it was: stop the loop first
            (new or old).send(m.Shutdown())
            worker.join(10)
        held = held_request_ids(native_runner)
        if held:
            native_runner.drop(held)
        ctx.destroy(linger=0)


@pytest.mark.parametrize("ids", [[], ["never-seen"]])
def test_drop_ignores_what_the_runner_does_not_hold(native_runner, ids) -> None:
    native_runner.drop(ids)
    assert held_request_ids(native_runner) == []
