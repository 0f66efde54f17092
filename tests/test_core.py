"""The engine core (engine/core.py): one drive loop over three kinds of handle.

The same requests give the same plans whether the runner answers at once (``InProcess``),
later through ``complete`` (as the pool's sockets do), or at a time a cost model gives (the
simulator); the observer sees every scheduler input and decision, in order; stale results
and lost workers are handled once, here."""

from __future__ import annotations

import msgspec
from fakes import FakeWorker, make_request, make_scheduler, reference_output

from engine.core import CoreObserver, EngineCore, InProcess, IntegrityCheck, WorkerLost
from engine.messages import (
    EngineRequest,
    RequestOutput,
    SamplingParams,
    StepPlan,
    StepResult,
)
from engine.sim.cost_model import CostModel
from engine.sim.simulator import SimConfig, Simulator
from engine.sim.workloads import SimRequest

BLOCK = 4
BLOCKS = 64


class Recorder(CoreObserver):
    """Every observer call, as a tuple."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_add(self, request: EngineRequest, outputs: list[RequestOutput], now: float) -> None:
        self.events.append(("add", request.request_id, len(outputs), now))

    def on_abort(self, request_ids, now: float) -> None:
        self.events.append(("abort", tuple(request_ids), now))

    def on_worker_added(self, worker_id: int, num_blocks: int, incarnation: int,
                        now: float) -> None:
        self.events.append(("worker_added", worker_id, num_blocks, incarnation, now))

    def on_worker_removed(self, worker_id: int, moved: list[str], now: float) -> None:
        self.events.append(("worker_removed", worker_id, tuple(moved), now))

    def on_plan(self, worker_id: int, plan: StepPlan | None, now: float) -> None:
        self.events.append(("plan", worker_id, None if plan is None else plan.step_id, now))

    def on_result(self, plan: StepPlan, result: StepResult, outputs: list[RequestOutput],
                  now: float) -> None:
        self.events.append(("result", plan.step_id, tuple(o.request_id for o in outputs), now))

    def on_fail(self, plan: StepPlan, message: str, now: float) -> None:
        self.events.append(("fail", plan.step_id, message, now))


class Plans(CoreObserver):
    """The plans made, per worker, as bytes (msgspec: equal plans, equal bytes)."""

    def __init__(self) -> None:
        self.by_worker: dict[int, list[bytes]] = {}

    def on_plan(self, worker_id: int, plan: StepPlan | None, now: float) -> None:
        if plan is not None:
            self.by_worker.setdefault(worker_id, []).append(msgspec.msgpack.encode(plan))


class Later:
    """A handle whose results come later, as the pool's sockets: ``submit`` keeps the plan."""

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.sent: list[StepPlan] = []
        self.lost = False

    def ready(self) -> bool:
        return True

    def submit(self, plan: StepPlan, now: float) -> None:
        if self.lost:
            raise WorkerLost
        self.sent.append(plan)


def requests(n: int) -> list[EngineRequest]:
    return [make_request(f"r{i}", prompt_len=6 + 3 * i, max_tokens=4 + i % 3, seed=i)
            for i in range(n)]


def test_sync_and_deferred_handles_make_the_same_plans_and_outputs() -> None:
    reqs = requests(8)
    plans_sync, plans_later = Plans(), Plans()
    sync = EngineCore(make_scheduler(block_size=BLOCK, max_num_batched_tokens=16), plans_sync)
    later = EngineCore(make_scheduler(block_size=BLOCK, max_num_batched_tokens=16), plans_later)
    handles = {w: Later(FakeWorker(w, BLOCKS, BLOCK)) for w in (0, 1)}
    for w in (0, 1):
        sync.add_worker(w, InProcess(FakeWorker(w, BLOCKS, BLOCK).step), BLOCKS, 0.0)
        later.add_worker(w, handles[w], BLOCKS, 0.0)
    for r in reqs:
        sync.add(r, 0.0)
        later.add(r, 0.0)
    tokens: dict[str, dict[str, list[int]]] = {"sync": {}, "later": {}}
    now = 0.0
    while sync.num_unfinished or later.num_unfinished:
        now += 1.0
        assert sync.step(now) or not sync.num_unfinished
        assert later.step(now) or not later.num_unfinished
        for w, h in handles.items():  # the results arrive after every plan went out
            while h.sent:
                plan = h.sent.pop(0)
                assert later.complete(w, h.worker.step(plan), now) is plan
        for name, core in (("sync", sync), ("later", later)):
            for o in core.take_outputs():
                tokens[name].setdefault(o.request_id, []).extend(o.new_token_ids)
    assert plans_sync.by_worker == plans_later.by_worker
    assert set(plans_sync.by_worker) == {0, 1}, "both workers ran steps"
    assert tokens["sync"] == tokens["later"] == {r.request_id: reference_output(r)
                                                 for r in reqs}


def test_the_simulator_makes_the_plans_an_in_process_runner_gets() -> None:
    """One worker, every request at t=0: the simulator's first step holds the first request
    only (it arrives alone); after it, both drivers plan from the same state."""
    sim_reqs = [SimRequest(request_id=f"s{i}", arrival_time=0.0,
                           prompt_token_ids=tuple((i * 37 + j) % 500 for j in range(5 + 4 * i)),
                           max_tokens=3 + i, seed=i) for i in range(6)]
    config = SimConfig(num_workers=1, block_size=BLOCK, num_blocks=BLOCKS, max_model_len=256,
                       scheduler=make_scheduler().config, check=True)
    sim_plans = Plans()
    cost = CostModel(step_s=1e-3, prefill_token_s=1e-5, decode_seq_s=1e-5, context_token_s=0.0)
    result = Simulator(sim_reqs, cost, config, observer=sim_plans).run()
    assert all(r.num_output_tokens == r.max_tokens for r in result.records)

    sync_plans = Plans()
    sched = make_scheduler()
    core = EngineCore(sched, sync_plans)
    core.add_worker(0, InProcess(FakeWorker(0, BLOCKS, BLOCK).step), BLOCKS, 0.0)
    as_engine = [EngineRequest(request_id=r.request_id, prompt_token_ids=r.prompt_token_ids,
                               sampling=SamplingParams(max_tokens=r.max_tokens, temperature=0.0,
                                                       ignore_eos=True, seed=r.seed))
                 for r in sim_reqs]
    core.add(as_engine[0], 0.0)
    core.step(0.0)  # the simulator offers a step on the first arrival
    for r in as_engine[1:]:
        core.add(r, 0.0)
    while core.num_unfinished:
        assert core.step(1.0)
    assert sim_plans.by_worker == sync_plans.by_worker
    assert len(sync_plans.by_worker[0]) > 3


def test_the_observer_sees_every_input_and_decision_in_order() -> None:
    rec = Recorder()
    sched = make_scheduler(block_size=BLOCK, placement="round-robin")
    core = EngineCore(sched, rec)
    h0, h1 = Later(FakeWorker(0, BLOCKS, BLOCK)), Later(FakeWorker(1, BLOCKS, BLOCK, 3))
    core.add_worker(0, h0, BLOCKS, 1.0)
    core.add_worker(1, h1, BLOCKS, 1.0, incarnation=3)
    core.add(make_request("a", seed=1), 2.0)  # round robin: worker 0
    core.add(make_request("b", seed=2), 2.0)  # worker 1
    core.add(make_request("a", seed=1), 2.5)  # a duplicate id: refused at once
    assert [o.finish_reason for o in core.take_outputs()] == ["error"]
    core.step(3.0)
    (pa,), (pb,) = h0.sent, h1.sent
    core.step(3.5)  # both busy: asked, nothing planned
    result = h0.worker.step(pa)
    stale = msgspec.structs.replace(result, step_id=pa.step_id + 100)
    assert core.complete(0, stale, 4.0) is None, "a result for another step is dropped"
    assert core.complete(0, result, 4.5) is pa
    assert core.fail(1, pb.step_id, 2, "boom", 5.0) is None, "another incarnation's failure"
    assert core.fail(1, pb.step_id, 3, "boom", 5.5) is pb
    core.abort(["a"], 6.0)
    core.add(make_request("c", seed=3), 7.0)  # worker 0 (round robin)
    h0.lost = True
    core.step(8.0)  # worker 0's plan cannot be sent: it is removed, "c" moves to worker 1
    (pc,) = h1.sent[1:]
    assert [r.request_id for r in pc.new_requests] == ["c"]
    assert rec.events == [
        ("worker_added", 0, BLOCKS, 0, 1.0),
        ("worker_added", 1, BLOCKS, 3, 1.0),
        ("add", "a", 0, 2.0),
        ("add", "b", 0, 2.0),
        ("add", "a", 1, 2.5),
        ("plan", 0, pa.step_id, 3.0),
        ("plan", 1, pb.step_id, 3.0),
        ("plan", 0, None, 3.5),
        ("plan", 1, None, 3.5),
        ("result", pa.step_id, ("a",), 4.5),
        ("fail", pb.step_id, "boom", 5.5),
        ("abort", ("a",), 6.0),
        ("add", "c", 0, 7.0),
        ("plan", 0, pc.step_id - 1, 8.0),
        ("worker_removed", 0, ("c",), 8.0),
        ("plan", 1, pc.step_id, 8.0),
    ]
    assert list(core.handles) == [1] and list(sched.workers) == [1]
    sched.check_integrity()


def test_an_unused_observer_and_an_integrity_check_change_nothing() -> None:
    outs = []
    for observer in (None, "check"):
        sched = make_scheduler(block_size=BLOCK, max_num_batched_tokens=12)
        core = EngineCore(sched, IntegrityCheck(sched) if observer else None)
        core.add_worker(0, InProcess(FakeWorker(0, 24, BLOCK).step), 24, 0.0)
        for r in requests(6):
            core.add(r, 0.0)
        got: dict[str, list[int]] = {}
        while core.num_unfinished:
            core.step(1.0)
            for o in core.take_outputs():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
        outs.append(got)
    assert outs[0] == outs[1] == {r.request_id: reference_output(r) for r in requests(6)}
