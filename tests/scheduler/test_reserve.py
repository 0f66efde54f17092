"""Reserved workers (``--reserved-workers``): while non-sheddable requests arrive, sheddable
ones are kept off the reserved workers, so a critical arrival finds a worker with no
sheddable step in flight to wait for (issue 15)."""

from __future__ import annotations

from fakes import FakeWorker, make_request, make_scheduler, reference_output, run_to_completion

from engine.config import SchedulerConfig
from engine.scheduler.policy import PriorityPolicy
from engine.scheduler.scheduler import Scheduler
from engine.scheduler.state import RESERVE_WINDOW_S


def build(sched, num_workers=2, num_blocks=64):
    workers = {w: FakeWorker(w, num_blocks, 4) for w in range(num_workers)}
    for w in workers:
        sched.add_worker(w, num_blocks, 0.0)
    return sched, workers


def where(sched, reqs):
    return {r.request_id: sched.requests[r.request_id].worker_id for r in reqs}


def low(rid, seed, max_tokens=5):
    return make_request(rid, prompt_len=6, max_tokens=max_tokens, seed=seed, priority=-1)


def test_sheddable_requests_stay_off_the_reserved_worker_while_critical_ones_arrive():
    """No critical traffic: sheddable requests spread over both workers. A critical arrival
    reserves the highest-id worker: the sheddable requests waiting there move to the other
    (the one running there finishes where it is), the critical request goes there, and new
    sheddable ones avoid it; RESERVE_WINDOW_S after the latest critical arrival, the
    reservation lapses. Every output is the reference's, no block leaks."""
    sched, workers = build(make_scheduler(policy="priority", placement="least-loaded",
                                          reserved_workers=1, max_num_seqs=8,
                                          max_num_batched_tokens=6))
    first = [low(f"a{i}", i, max_tokens=12) for i in range(6)]
    for r in first:
        sched.add(r, 0.0)
    assert set(where(sched, first).values()) == {0, 1}
    assert sched.stats().reserved_worker_ids == []
    out: dict[str, list[int]] = {}
    plan = sched.schedule(1, 0.0)  # worker 1 runs one of them (a budget of one prompt)
    for o in sched.update(plan, workers[1].step(plan), 0.0):
        out.setdefault(o.request_id, []).extend(o.new_token_ids)
    running_on_1 = {n.request_id for n in plan.new_requests}
    assert len(running_on_1) == 1
    assert sched.num_waiting(1) == 2  # these two move when the reservation starts

    crit = make_request("crit", prompt_len=6, max_tokens=4, seed=99, priority=0)
    sched.add(crit, 1.0)
    assert sched.stats().reserved_worker_ids == [1]
    placed = where(sched, [*first, crit])
    assert placed["crit"] == 1
    assert {rid for rid, w in placed.items() if w == 1} == running_on_1 | {"crit"}
    sched.check_integrity()
    later = [low(f"b{i}", 10 + i) for i in range(4)]
    for r in later:
        sched.add(r, 1.0 + RESERVE_WINDOW_S - 0.1)
    assert set(where(sched, later).values()) == {0}
    assert sched.stats().reserved_worker_ids == [1]

    lapsed = low("c", 30)
    sched.add(lapsed, 1.0 + RESERVE_WINDOW_S + 0.1)  # no critical arrival for the window
    assert sched.stats().reserved_worker_ids == []
    assert where(sched, [lapsed]) == {"c": 1}  # the least loaded again
    rest = run_to_completion(sched, workers, now=20.0)
    for r in [*first, crit, *later, lapsed]:
        assert out.get(r.request_id, []) + rest.get(r.request_id, []) == reference_output(r)
    assert all(ws.blocks.num_free_blocks == ws.blocks.num_blocks
               for ws in sched.workers.values())


class StealEverything(PriorityPolicy):
    """``priority``, but an idle worker takes sheddable requests too."""

    def may_steal(self, req):
        return True


def test_a_reserved_worker_takes_no_sheddable_request_from_a_busy_one():
    """Late binding stops at the reservation: an idle reserved worker takes the critical
    request waiting on a busy worker, never the sheddable ones (even for a policy that
    lets it); an unreserved worker takes both."""
    cfg = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, policy="priority",
                          placement="round-robin", reserved_workers=1)
    sched, workers = build(Scheduler(cfg, block_size=4, max_model_len=256,
                                     policy=StealEverything()))
    busy = [make_request(f"busy{w}", prompt_len=6, max_tokens=8, seed=w, priority=0)
            for w in (0, 1)]
    for r in busy:
        sched.add(r, 0.0)  # round robin: one on each worker; worker 1 is reserved
    plans = {w: sched.schedule(w, 0.0) for w in (0, 1)}
    assert all(plans.values())
    queued = [low("low0", 20), low("low1", 21)]
    for r in queued:
        sched.add(r, 0.1)
    assert set(where(sched, queued).values()) == {0}
    crit = make_request("crit", prompt_len=6, max_tokens=3, seed=9, priority=0)
    crit2 = make_request("crit2", prompt_len=6, max_tokens=3, seed=8, priority=0)
    sched.add(crit, 0.1)
    sched.add(crit2, 0.1)
    sched_requests = [*busy, *queued, crit, crit2]
    assert where(sched, [crit]) == {"crit": 0}  # round robin put it on the busy worker
    out: dict[str, list[int]] = {}
    for o in sched.update(plans[1], workers[1].step(plans[1]), 0.2):
        out.setdefault(o.request_id, []).extend(o.new_token_ids)
    plan = sched.schedule(1, 0.2)
    taken = {n.request_id for n in plan.new_requests}
    assert "crit" in taken and not taken & {"low0", "low1"}
    sched.check_integrity()
    for w, p in ((0, plans[0]), (1, plan)):
        for o in sched.update(p, workers[w].step(p), 0.3):
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    rest = run_to_completion(sched, workers, now=1.0)
    for r in sched_requests:
        assert out.get(r.request_id, []) + rest.get(r.request_id, []) == reference_output(r)


def test_nothing_is_reserved_without_a_worker_to_spare():
    """One live worker (the other died) serves everything, reserved or not; with
    ``reserved_workers`` 0 (GPUs, one worker) or unresolved (None), nothing is reserved."""
    sched, workers = build(make_scheduler(policy="priority", reserved_workers=1))
    sched.add(make_request("crit", seed=1, priority=0), 0.0)
    assert sched.stats().reserved_worker_ids == [1]
    sched.add(low("before", 2), 0.0)
    assert sched.requests["before"].worker_id == 0
    sched.remove_worker(0, 0.5)  # the unreserved worker dies: its requests move to 1
    del workers[0]
    assert sched.stats().reserved_worker_ids == []
    assert sched.requests["before"].worker_id == 1
    sched.add(low("after", 3), 0.6)
    assert sched.requests["after"].worker_id == 1
    rest = run_to_completion(sched, workers, now=1.0)
    assert set(rest) == {"crit", "before", "after"}
    for reserved in (0, None):
        sched, _ = build(make_scheduler(policy="priority", reserved_workers=reserved))
        sched.add(make_request("crit", seed=1, priority=0), 0.0)
        assert sched.stats().reserved_worker_ids == []


def test_a_critical_prompt_step_names_the_outranked_steps_in_flight_elsewhere():
    """``outranked_in_flight``: while a worker's step computes a critical prompt, the other
    workers whose steps in flight hold only work it outranks (the pool pauses them where the
    workers share cores: engine/pool/suspend.py); none with a step that holds a request of
    its class, none where the workers do not share cores or the policy does not hold."""
    for policy, share, peer_in_flight, expected in (
            ("priority", "yes", False, [0]), ("priority", "yes", True, []),
            ("priority", "no", False, []), ("fcfs", "yes", False, [])):
        sched, workers = build(make_scheduler(policy=policy, placement="round-robin",
                                              workers_share_cores=share, reserved_workers=0,
                                              max_num_seqs=8))
        reqs = [low("low0", 1, max_tokens=10), low("low1", 2, max_tokens=10)]
        if peer_in_flight:
            reqs[0] = make_request("peer", prompt_len=6, max_tokens=10, seed=3, priority=1)
        for r in reqs:
            sched.add(r, 0.0)  # round robin: one on each worker
        plans = {w: sched.schedule(w, 0.0) for w in (1, 0)}
        assert sched.outranked_in_flight(1) == []
        assert sched.outranked_in_flight(0) == ([1] if peer_in_flight else [])  # peer's prompt
        out: dict[str, list[int]] = {}
        for o in sched.update(plans[1], workers[1].step(plans[1]), 0.1):
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        crit = make_request("crit", prompt_len=9, max_tokens=3, seed=99, priority=1)
        sched.add(crit, 0.2)
        plan = sched.schedule(1, 0.2)  # placed there, or taken from busy worker 0
        if policy == "priority":
            assert "crit" in [n.request_id for n in plan.new_requests]
        assert sched.outranked_in_flight(1) == expected, (policy, share, peer_in_flight)
        assert sched.outranked_in_flight(0) == []  # its step computes no critical prompt
        for w, p in ((1, plan), (0, plans[0])):
            for o in sched.update(p, workers[w].step(p), 0.3):
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert sched.outranked_in_flight(1) == []  # that step ended
        rest = run_to_completion(sched, workers, now=1.0)
        for r in [*reqs, crit]:
            assert out.get(r.request_id, []) + rest.get(r.request_id, []) == reference_output(r)
