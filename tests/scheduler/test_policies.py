"""Policies (queue order, priority preemption, fair share) and placement scorers."""

from __future__ import annotations

import pytest
from fakes import FakeWorker, make_request, make_scheduler, reference_output, run_to_completion

from engine.config import SchedulerConfig
from engine.scheduler.placement import CacheAware, get_placement
from engine.scheduler.policy import Policy, get_policy
from engine.scheduler.scheduler import Scheduler


def build(num_workers=1, num_blocks=64, **kw):
    sched = make_scheduler(**kw)
    workers = {w: FakeWorker(w, num_blocks, 4) for w in range(num_workers)}
    for w in workers:
        sched.add_worker(w, num_blocks, 0.0)
    return sched, workers


def step(sched, workers, w=0, now=0.0, out=None):
    plan = sched.schedule(w, now)
    outs = sched.update(plan, workers[w].step(plan), now) if plan else []
    sched.check_integrity()
    if out is not None:
        for o in outs:
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return plan, outs


def test_critical_request_at_a_full_engine_starts_in_the_next_step():
    sched, workers = build(max_num_seqs=4, policy="priority")
    low = [make_request(f"low{i}", prompt_len=6, max_tokens=30, seed=i, priority=-1)
           for i in range(4)]
    for r in low:
        sched.add(r, 0.0)
    out: dict[str, list[int]] = {}
    for _ in range(3):
        step(sched, workers, out=out)  # the batch is full of sheddable decodes
    crit = make_request("crit", prompt_len=6, max_tokens=5, seed=99, priority=10)
    sched.add(crit, 1.0)
    plan, _ = step(sched, workers, now=1.0, out=out)
    assert [n.request_id for n in plan.new_requests] == ["crit"]
    assert plan.num_requests <= 4 and sched.num_preemptions == 1
    out_rest = run_to_completion(sched, workers)
    for r in [*low, crit]:
        assert out.get(r.request_id, []) + out_rest.get(r.request_id, []) == reference_output(r)


def test_equal_priorities_never_preempt_each_other():
    sched, workers = build(max_num_seqs=2, policy="priority")
    for i in range(2):
        sched.add(make_request(f"a{i}", max_tokens=10, seed=i, priority=1), 0.0)
    step(sched, workers)
    sched.add(make_request("b", max_tokens=10, seed=5, priority=1), 0.0)
    for _ in range(5):
        step(sched, workers)
    assert sched.num_preemptions == 0


def test_no_preemption_when_it_could_not_admit_the_request():
    # The critical request needs more blocks than the victims and free blocks hold together.
    sched, workers = build(num_blocks=8, policy="priority", max_num_batched_tokens=64)
    sched.add(make_request("low", prompt_len=6, max_tokens=40, priority=-1), 0.0)
    step(sched, workers)
    sched.add(make_request("big", prompt_len=30, max_tokens=2, priority=5, seed=3), 0.0)
    # 30 prompt tokens need 8 blocks; "low" holds 2 of 8, so preempting it frees enough.
    plan, _ = step(sched, workers)
    assert sched.num_preemptions == 1 and plan.new_requests[0].request_id == "big"
    sched2, workers2 = build(num_blocks=8, policy="priority")
    sched2.add(make_request("mid", prompt_len=6, max_tokens=40, priority=5), 0.0)
    sched2.add(make_request("low", prompt_len=6, max_tokens=40, priority=-1, seed=1), 0.0)
    step(sched2, workers2)
    sched2.add(make_request("big", prompt_len=30, max_tokens=2, priority=3, seed=3), 0.0)
    step(sched2, workers2)
    assert sched2.num_preemptions == 0, "preempting 'low' alone cannot make room: don't"


def test_a_critical_prefill_step_holds_only_work_it_does_not_outrank():
    """``priority`` has ``exclusive_prefill``: lower-priority requests sit out the step of a
    critical prompt (keeping their blocks) and resume in the next one, unharmed. (16
    sequences: the outranked requests stay within their share of the batch.)"""
    sched, workers = build(policy="priority", max_num_seqs=16)
    reqs = [make_request("peer", prompt_len=5, max_tokens=20, seed=1, priority=10),
            make_request("normal", prompt_len=5, max_tokens=20, seed=2, priority=0),
            *(make_request(f"low{i}", prompt_len=5, max_tokens=20, seed=3 + i, priority=-1)
              for i in range(3))]
    for r in reqs:
        sched.add(r, 0.0)
    out: dict[str, list[int]] = {}
    for _ in range(4):  # admitted one priority level per step, then everyone decodes
        plan, _ = step(sched, workers, out=out)
    assert plan.num_requests == len(reqs)
    held = {rid: list(sched.requests[rid].block_ids) for rid in ("normal", "low0")}
    crit = make_request("crit", prompt_len=9, max_tokens=5, seed=99, priority=10)
    sched.add(crit, 1.0)
    plan, _ = step(sched, workers, now=1.0, out=out)
    assert [n.request_id for n in plan.new_requests] == ["crit"]
    assert [c.request_id for c in plan.cached_requests] == ["peer"], "equals are not deferred"
    assert {rid: sched.requests[rid].block_ids for rid in held} == held
    plan, _ = step(sched, workers, now=1.1, out=out)
    assert {c.request_id for c in plan.cached_requests} == {r.request_id for r in [*reqs, crit]}
    assert sched.num_preemptions == 0
    rest = run_to_completion(sched, workers)
    for r in [*reqs, crit]:
        assert out[r.request_id] + rest.get(r.request_id, []) == reference_output(r)


def test_outranked_requests_fill_at_most_their_share_of_the_batch():
    """``priority`` has ``outranked_seq_share`` 0.45: while a critical request is on the worker,
    sheddable ones are admitted only up to 45% of ``max_num_seqs`` (4 of 10); the rest of the
    batch stays free, and with no critical request they fill it."""
    sched, workers = build(policy="priority", max_num_seqs=10, max_num_batched_tokens=128)
    crit = make_request("crit", prompt_len=5, max_tokens=12, seed=99, priority=10)
    low = [make_request(f"low{i}", prompt_len=5, max_tokens=30, seed=i, priority=-1)
           for i in range(8)]
    for r in [crit, *low]:
        sched.add(r, 0.0)
    out: dict[str, list[int]] = {}
    plan, _ = step(sched, workers, out=out)
    assert [n.request_id for n in plan.new_requests] == ["crit"]  # exclusive prefill
    for _ in range(5):
        plan, _ = step(sched, workers, out=out)
        assert plan.num_requests == 5, "critical + 4 sheddable: 5 of 10 sequences stay free"
    while "crit" in sched.requests:
        step(sched, workers, out=out)
    plan, _ = step(sched, workers, out=out)
    assert plan.num_requests == 8, "no critical request left: sheddable ones fill the batch"
    rest = run_to_completion(sched, workers)
    for r in [crit, *low]:
        assert out[r.request_id] + rest.get(r.request_id, []) == reference_output(r)


def test_the_outranked_share_never_evicts_and_other_policies_have_none():
    # Sheddable requests already running keep running past their share when a critical
    # request comes; new ones wait until they are under it.
    sched, workers = build(policy="priority", max_num_seqs=10, max_num_batched_tokens=128)
    for i in range(8):
        sched.add(make_request(f"low{i}", prompt_len=5, max_tokens=30, seed=i, priority=-1), 0.0)
    step(sched, workers)
    sched.add(make_request("crit", prompt_len=5, max_tokens=30, seed=99, priority=10), 1.0)
    sched.add(make_request("late", prompt_len=5, max_tokens=30, seed=50, priority=-1), 1.0)
    step(sched, workers, now=1.0)  # the critical prompt's exclusive step
    for _ in range(3):
        plan, _ = step(sched, workers, now=1.1)
        assert plan.num_requests == 9 and "late" not in {c.request_id for c in plan.new_requests}
    assert sched.num_preemptions == 0
    # fcfs (and every other built-in policy) admits up to max_num_seqs whatever the priorities.
    for name in ("fcfs", "sjf", "fair", "lpm"):
        assert get_policy(name).outranked_seq_share is None
    sched, workers = build(policy="fcfs", max_num_seqs=10, max_num_batched_tokens=128)
    sched.add(make_request("crit", prompt_len=5, max_tokens=30, seed=99, priority=10), 0.0)
    for i in range(8):
        sched.add(make_request(f"low{i}", prompt_len=5, max_tokens=30, seed=i, priority=-1), 0.0)
    plan, _ = step(sched, workers)
    assert plan.num_requests == 9


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_an_outranked_share_outside_0_to_1_is_refused(share):
    policy = type("Bad", (Policy,), {"outranked_seq_share": share})()
    with pytest.raises(ValueError, match="outranked_seq_share"):
        Scheduler(SchedulerConfig(), block_size=4, max_model_len=256, policy=policy)


def test_requests_are_not_deferred_for_a_prompt_that_cannot_start():
    """When the outranking request cannot be admitted (and preempting would not help),
    the step runs everyone else as usual: deferral never stalls a worker."""
    sched, workers = build(num_blocks=8, policy="priority")
    sched.add(make_request("mid", prompt_len=6, max_tokens=40, priority=5), 0.0)
    sched.add(make_request("low", prompt_len=6, max_tokens=40, priority=-1, seed=1), 0.0)
    step(sched, workers)
    step(sched, workers)
    sched.add(make_request("big", prompt_len=30, max_tokens=2, priority=3, seed=3), 0.0)
    plan, _ = step(sched, workers)
    assert not plan.new_requests and sched.num_preemptions == 0
    assert {c.request_id for c in plan.cached_requests} == {"mid", "low"}


def test_sjf_orders_by_prompt_length_and_by_max_tokens():
    for policy, expect in (("sjf", ["short", "mid", "long"]), ("sjf-max-tokens", ["long", "mid", "short"])):
        sched, workers = build(max_num_seqs=1, policy=policy)
        sched.add(make_request("long", prompt_len=30, max_tokens=1), 0.0)
        sched.add(make_request("short", prompt_len=5, max_tokens=9, seed=1), 0.1)
        sched.add(make_request("mid", prompt_len=15, max_tokens=4, seed=2), 0.2)
        order = []
        while sched.num_unfinished:
            plan, _ = step(sched, workers)
            order += [n.request_id for n in plan.new_requests]
        assert order == expect, policy


def test_fair_share_serves_the_least_served_tenant_first():
    sched, workers = build(max_num_seqs=1, policy="fair")
    for i in range(3):
        sched.add(make_request(f"heavy{i}", prompt_len=8, max_tokens=4, seed=i, tenant="heavy",
                               arrival=i * 0.01), 0.0)
    sched.add(make_request("light0", prompt_len=8, max_tokens=4, seed=7, tenant="light",
                           arrival=0.5), 0.0)
    order = []
    while sched.num_unfinished:
        plan, _ = step(sched, workers)
        order += [n.request_id for n in plan.new_requests]
    assert order.index("light0") == 1, order  # after one heavy request, not after all three


def test_lpm_admits_the_longest_cached_prefix_first():
    sched, workers = build(max_num_seqs=1, policy="lpm")
    shared = tuple(range(400, 416))
    sched.add(make_request("warm", prompt_len=1, max_tokens=1, prefix=shared), 0.0)
    run_to_completion(sched, workers)
    sched.add(make_request("cold", prompt_len=20, max_tokens=1, seed=3, arrival=0.0), 0.0)
    sched.add(make_request("hit", prompt_len=2, max_tokens=1, prefix=shared, arrival=1.0), 0.0)
    plan, _ = step(sched, workers)
    assert plan.new_requests[0].request_id == "hit"


def test_cache_aware_placement_follows_the_prefix_and_avoids_hot_spots():
    sched, workers = build(num_workers=4, placement="cache-aware")
    shared = tuple(range(700, 764))  # 16 blocks
    sched.add(make_request("seed", prompt_len=1, max_tokens=1, prefix=shared), 0.0)
    home = sched.requests["seed"].worker_id
    run_to_completion(sched, workers)
    sched.add(make_request("follow", prompt_len=3, max_tokens=1, prefix=shared, seed=1), 0.0)
    assert sched.requests["follow"].worker_id == home
    assert sched.requests["follow"].predicted_cached_tokens == 64
    # Pile unrelated queued work on the home worker: past the guard, the cache no longer wins.
    for i in range(6):
        sched.add(make_request(f"bulk{i}", prompt_len=100, max_tokens=1, seed=10 + i), 0.0)
        ws = sched.workers[sched.requests[f"bulk{i}"].worker_id]
        if ws.worker_id != home:  # force the bulk onto the home worker for the test
            bulk = sched.requests[f"bulk{i}"]
            ws.unqueue(bulk)
            bulk.worker_id = home
            sched.workers[home].enqueue(bulk, sched.policy.queue_key(bulk), 1000 + i)
    sched.add(make_request("late", prompt_len=3, max_tokens=1, prefix=shared, seed=2), 0.0)
    assert sched.requests["late"].worker_id != home
    sched.check_integrity()


def test_round_robin_and_least_loaded_spread_requests():
    sched, _ = build(num_workers=3, placement="round-robin")
    for i in range(6):
        sched.add(make_request(f"r{i}", seed=i), 0.0)
    assert [sched.requests[f"r{i}"].worker_id for i in range(6)] == [0, 1, 2, 0, 1, 2]
    sched, _ = build(num_workers=3, placement="least-loaded")
    for i in range(6):
        sched.add(make_request(f"r{i}", seed=i), 0.0)
    assert sorted(len(ws.waiting) for ws in sched.workers.values()) == [2, 2, 2]


def test_final_output_explains_the_decisions():
    sched, workers = build(num_workers=2)
    shared = tuple(range(800, 816))
    sched.add(make_request("a", prompt_len=1, max_tokens=1, prefix=shared, arrival=0.0), 0.0)
    run_to_completion(sched, workers)
    sched.add(make_request("b", prompt_len=1, max_tokens=2, prefix=shared, arrival=1.0), 1.0)
    explanations = []
    while sched.num_unfinished:
        plan = sched.schedule(sched.requests["b"].worker_id, 1.5)
        for o in sched.update(plan, workers[plan.worker_id].step(plan), 2.0):
            if o.finish_reason:
                explanations.append(o.explanation)
    (e,) = explanations
    assert e.placement == "cache-aware" and set(e.placement_scores) == {0, 1}
    assert e.predicted_cached_tokens == e.realized_cached_tokens == 16
    assert e.queue_time_s == pytest.approx(0.5) and e.num_preemptions == 0


class MyPolicy(Policy):
    name = "mine"


def test_plugins_load_by_import_path_and_bad_names_are_clear():
    assert get_policy("tests.scheduler.test_policies:MyPolicy").name == MyPolicy.name
    assert isinstance(get_placement("engine.scheduler.placement:CacheAware"), CacheAware)
    with pytest.raises(ValueError, match="--policy: unknown name 'nope'"):
        get_policy("nope")
    with pytest.raises(ValueError, match="--placement"):
        get_placement("nope:Nothing")
    with pytest.raises(ValueError, match="not a subclass"):
        get_policy("engine.scheduler.placement:CacheAware")


def test_sheddable_prefill_is_capped_per_step_and_other_work_is_not():
    """``priority`` has ``capped_prefill_tokens`` 64: the prompts of sheddable requests
    (priority < 0) compute at most 64 tokens per step, as whole prompts and chunks alike,
    so a step a later request waits for stays short; a critical prompt in the same step, and
    sheddable decodes, are not counted; every output is still exact. ``fcfs`` has no cap."""
    sched, workers = build(policy="priority", max_num_seqs=16, max_num_batched_tokens=512,
                           num_blocks=256)
    low = [make_request(f"low{i}", prompt_len=40, max_tokens=6, seed=i, priority=-1)
           for i in range(6)]
    for r in low:
        sched.add(r, 0.0)
    out: dict[str, list[int]] = {}
    prompt_tokens = []
    for _ in range(3):
        plan, _ = step(sched, workers, out=out)
        prompt_tokens.append(sum(n for _, n in plan.scheduled() if n > 1))  # not decodes
        assert prompt_tokens[-1] <= 64
        assert plan.num_scheduled_tokens <= 64 + plan.num_requests  # 64 prompt + decodes
    assert prompt_tokens[0] == 64  # 40 + a 24-token chunk of the next prompt
    crit = make_request("crit", prompt_len=100, max_tokens=3, seed=99, priority=1)
    sched.add(crit, 1.0)
    plan, _ = step(sched, workers, out=out)
    assert dict(plan.scheduled())["crit"] == 100  # not capped, and alone (exclusive prefill)
    rest = run_to_completion(sched, workers)
    for r in [crit, *low]:
        assert out.get(r.request_id, []) + rest.get(r.request_id, []) == reference_output(r)

    fcfs, fcfs_workers = build(policy="fcfs", max_num_seqs=16, max_num_batched_tokens=512,
                               num_blocks=256)
    for r in low:
        fcfs.add(r, 0.0)
    plan, _ = step(fcfs, fcfs_workers)
    assert plan.num_scheduled_tokens == 6 * 40  # every prompt at once


def test_an_idle_worker_takes_a_critical_request_queued_on_a_busy_one():
    """Late binding (``priority``'s ``may_steal``): a critical request placed on a busy
    worker starts on the first worker to be free; a sheddable one stays where it was placed,
    and ``fcfs`` never moves a request."""
    for policy, moves in (("priority", True), ("fcfs", False)):
        sched, workers = build(num_workers=2, policy=policy, max_num_seqs=8)
        for w in (0, 1):
            sched.add(make_request(f"busy{w}", prompt_len=6, max_tokens=8, seed=w), 0.0)
        plans = {w: sched.schedule(w, 0.0) for w in (0, 1)}  # both workers busy
        assert all(plans.values())
        crit = make_request("crit", prompt_len=6, max_tokens=3, seed=9, priority=1)
        low = make_request("low", prompt_len=6, max_tokens=3, seed=8, priority=-1)
        sched.add(crit, 0.0)
        sched.add(low, 0.0)
        placed = {r: sched.requests[r].worker_id for r in ("crit", "low")}
        free = 1 - placed["crit"]  # the other worker's step ends first
        sched.update(plans[free], workers[free].step(plans[free]), 1.0)
        out: dict[str, list[int]] = {}
        plan, _ = step(sched, workers, w=free, now=1.0, out=out)
        ids = [n.request_id for n in plan.new_requests]
        assert ("crit" in ids) is moves, (policy, ids)
        if placed["low"] != free:
            assert "low" not in ids
        sched.check_integrity()
        busy = 1 - free
        sched.update(plans[busy], workers[busy].step(plans[busy]), 2.0)
        rest = run_to_completion(sched, workers)
        for r in (crit, low):
            assert out.get(r.request_id, []) + rest.get(r.request_id, []) == reference_output(r)


def test_a_critical_prefill_step_on_one_worker_holds_outranked_work_on_the_others():
    """``priority``'s ``exclusive_prefill_across_workers``: while one worker's step computes
    a critical prompt, the other worker runs nothing that prompt outranks (its sheddable
    decodes sit out, keeping their blocks; it has no work until that step ends), but runs
    what it does not outrank; then everything resumes, no token lost. Sheddable prefill
    holds nothing; workers that do not share cores (``--workers-share-cores no``: GPUs)
    never hold, and ``fcfs`` never holds."""
    for policy, share, holds in (("priority", "yes", True), ("priority", "no", False),
                                 ("fcfs", "yes", False)):
        sched, workers = build(num_workers=2, policy=policy, max_num_seqs=16,
                               placement="round-robin", workers_share_cores=share)
        lows = [make_request(f"low{i}", prompt_len=6, max_tokens=12, seed=i, priority=-1)
                for i in range(4)]
        for r in lows:
            sched.add(r, 0.0)
        out: dict[str, list[int]] = {}
        plans = {w: sched.schedule(w, 0.0) for w in (0, 1)}  # both prefill sheddable prompts
        assert all(plans.values()), "a sheddable prompt's step holds no other worker"
        for w in (0, 1):
            for o in sched.update(plans[w], workers[w].step(plans[w]), 0.0):
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        crit = make_request("crit", prompt_len=9, max_tokens=4, seed=99, priority=1)
        sched.add(crit, 1.0)
        w = sched.requests["crit"].worker_id
        other = 1 - w
        plan = sched.schedule(w, 1.0)
        assert [n.request_id for n in plan.new_requests] == ["crit"]
        blocks = {r.request_id: list(sched.requests[r.request_id].block_ids) for r in lows}
        held = sched.schedule(other, 1.0)
        assert (held is None) is holds, (policy, share)
        if holds:  # the pool waits for a message, not polling; what it does not outrank runs
            assert not sched.has_work(other)
            peer = make_request("peer", prompt_len=6, max_tokens=2, seed=50, priority=1)
            sched.add(peer, 1.0)
            held = sched.schedule(other, 1.0)
            assert [n.request_id for n in held.new_requests] == ["peer"]
            assert not held.cached_requests
            assert {r.request_id: sched.requests[r.request_id].block_ids for r in lows} == blocks
        for o in sched.update(plan, workers[w].step(plan), 1.1):
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        if held is not None:
            for o in sched.update(held, workers[other].step(held), 1.1):
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        resumed = sched.schedule(other, 1.2)  # the critical prompt is computed: all resume
        assert {c.request_id for c in resumed.cached_requests} >= {
            r.request_id for r in lows if sched.requests[r.request_id].worker_id == other}
        for o in sched.update(resumed, workers[other].step(resumed), 1.2):
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        sched.check_integrity()
        rest = run_to_completion(sched, workers)
        assert sched.num_preemptions == 0
        for r in [*lows, crit]:
            assert out.get(r.request_id, []) + rest.get(r.request_id, []) == reference_output(r)
