"""The pure scheduler, driven with a fake stateful worker; invariants checked at every call."""

from __future__ import annotations

import msgspec
import pytest
from fakes import FakeWorker, make_request, make_scheduler, reference_output, run_to_completion

from engine.messages import StepResult


def setup(num_workers: int = 1, num_blocks: int = 64, block_size: int = 4, **kw):
    sched = make_scheduler(block_size=block_size, **kw)
    workers = {w: FakeWorker(w, num_blocks, block_size) for w in range(num_workers)}
    for w in workers:
        sched.add_worker(w, num_blocks, now=0.0)
    return sched, workers


def test_requests_finish_with_uninterrupted_outputs_and_no_leak():
    sched, workers = setup(num_workers=2)
    reqs = [make_request(f"r{i}", prompt_len=5 + i, max_tokens=3 + i % 4, seed=i) for i in range(10)]
    for r in reqs:
        assert sched.add(r, now=0.0) == []
    out = run_to_completion(sched, workers)
    for r in reqs:
        assert out[r.request_id] == reference_output(r)
    assert all(ws.blocks.num_free_blocks == 64 for ws in sched.workers.values())


def test_eos_and_stop_tokens_end_a_request():
    sched, workers = setup()
    probe = make_request("p", prompt_len=6, max_tokens=8)
    ref = reference_output(probe)
    eos_req = make_request("eos", prompt_len=6, max_tokens=8, eos=(ref[2],))
    sched.add(eos_req, 0.0)
    out = run_to_completion(sched, workers)
    assert out["eos"] == ref[: ref.index(ref[2]) + 1]


def test_budget_and_sequence_cap_hold_in_every_plan():
    sched, workers = setup(max_num_batched_tokens=16, max_num_seqs=3)
    for i in range(8):
        sched.add(make_request(f"r{i}", prompt_len=11, max_tokens=4, seed=i), 0.0)
    while sched.num_unfinished:
        plan = sched.schedule(0, 0.0)
        assert plan is not None
        assert plan.num_scheduled_tokens <= 16
        assert plan.num_requests <= 3
        sched.update(plan, workers[0].step(plan), 0.0)
        sched.check_integrity()


def test_long_prompt_is_chunked_and_decodes_keep_running():
    sched, workers = setup(max_num_batched_tokens=8, num_blocks=64)
    sched.add(make_request("short", prompt_len=4, max_tokens=20), 0.0)
    plan = sched.schedule(0, 0.0)
    sched.update(plan, workers[0].step(plan), 0.0)  # "short" is now decoding
    sched.add(make_request("long", prompt_len=40, max_tokens=2, seed=3), 0.0)
    chunks = []
    while "long" in sched.requests and not sched.requests["long"].output_token_ids:
        plan = sched.schedule(0, 0.0)
        sizes = dict(plan.scheduled())
        assert sizes.get("short") == 1, "the decode was stalled behind a prefill"
        chunks.append(sizes.get("long", 0))
        sched.update(plan, workers[0].step(plan), 0.0)
    assert sum(chunks) == 40 and max(chunks) <= 7 and len(chunks) >= 6


def test_preemption_when_blocks_run_out_keeps_outputs_identical():
    # 12 blocks of 4 tokens: three requests growing to 8+20 tokens cannot all stay resident.
    sched, workers = setup(num_blocks=12, max_num_batched_tokens=64)
    reqs = [make_request(f"r{i}", prompt_len=8, max_tokens=20, seed=i) for i in range(3)]
    for r in reqs:
        sched.add(r, 0.0)
    out = run_to_completion(sched, workers)
    assert sched.num_preemptions > 0
    for r in reqs:
        assert out[r.request_id] == reference_output(r)
    assert sched.workers[0].blocks.num_free_blocks == 12


def test_abort_frees_blocks_even_while_the_step_runs():
    sched, workers = setup()
    for i in range(3):
        sched.add(make_request(f"r{i}", prompt_len=9, max_tokens=50, seed=i), 0.0)
    plan = sched.schedule(0, 0.0)
    result = workers[0].step(plan)
    outs = sched.abort(["r1", "missing"], 0.0)  # while the plan is in flight
    assert [(o.request_id, o.finish_reason) for o in outs] == [("r1", "abort")]
    updates = sched.update(plan, result, 0.0)
    assert "r1" not in {o.request_id for o in updates}
    sched.check_integrity()
    plan = sched.schedule(0, 0.0)
    assert "r1" in plan.finished_request_ids
    sched.update(plan, workers[0].step(plan), 0.0)
    sched.abort(list(sched.requests), 0.0)
    sched.check_integrity()
    assert sched.workers[0].blocks.num_free_blocks == 64


def test_dead_worker_requests_are_recomputed_elsewhere():
    sched, workers = setup(num_workers=2)
    reqs = [make_request(f"r{i}", prompt_len=6, max_tokens=10, seed=i) for i in range(6)]
    for r in reqs:
        sched.add(r, 0.0)
    assert {len(ws.waiting) for ws in sched.workers.values()} == {3}, "least-loaded balances"
    out: dict[str, list[int]] = {}
    for _ in range(3):
        for w in (0, 1):
            plan = sched.schedule(w, 0.0)
            for o in sched.update(plan, workers[w].step(plan), 0.0):
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
    plan = sched.schedule(1, 0.0)  # worker 1 dies with this plan in flight
    moved = sched.remove_worker(1, 0.0)
    assert len(moved) == 3
    sched.check_integrity()
    assert sched.update(plan, workers[1].step(plan), 0.0) == []  # a stale result is ignored
    rest = run_to_completion(sched, {0: workers[0]})
    for r in reqs:
        assert out.get(r.request_id, []) + rest.get(r.request_id, []) == reference_output(r)


def test_requests_wait_without_workers_and_run_when_one_joins():
    sched = make_scheduler()
    sched.add(make_request("a"), 0.0)
    assert sched.schedule(0, 0.0) is None
    sched.check_integrity()
    sched.add_worker(0, 16, 0.0)
    out = run_to_completion(sched, {0: FakeWorker(0, 16, 4)})
    assert out["a"] == reference_output(make_request("a"))


@pytest.mark.parametrize("prompt_len,error", [(0, "empty prompt"), (256, "context")])
def test_impossible_requests_fail_at_once(prompt_len, error):
    sched, _ = setup()
    (out,) = sched.add(make_request("x", prompt_len=prompt_len), 0.0)
    assert out.finish_reason == "error" and error in out.error
    assert sched.num_unfinished == 0


def test_request_larger_than_the_cache_fails_instead_of_hanging():
    sched, workers = setup(num_blocks=4)  # 16 tokens of KV
    (out,) = sched.add(make_request("big", prompt_len=20), 0.0)
    assert out.finish_reason == "error"
    grows = make_request("grows", prompt_len=10, max_tokens=50)
    sched.add(grows, 0.0)
    out = run_to_completion(sched, workers)
    # 16 slots hold 10 prompt tokens and 6 outputs; the 7th output is sampled from them.
    assert out["grows"] == reference_output(grows)[:7]
    assert sched.workers[0].blocks.num_free_blocks == 4


def test_stale_or_mismatched_results_are_ignored():
    sched, workers = setup()
    sched.add(make_request("a"), 0.0)
    plan = sched.schedule(0, 0.0)
    bogus = StepResult(step_id=plan.step_id + 1, worker_id=0, request_ids=[], token_ids=[])
    assert sched.update(plan, bogus, 0.0) == []
    assert sched.schedule(0, 0.0) is None, "the real plan is still in flight"
    sched.update(plan, workers[0].step(plan), 0.0)
    sched.check_integrity()


def test_plans_carry_the_incarnation_and_a_result_of_another_is_ignored():
    sched = make_scheduler()
    sched.add_worker(0, 16, 0.0, incarnation=3)
    req = make_request("a")
    sched.add(req, 0.0)
    plan = sched.schedule(0, 0.0)
    assert plan is not None and plan.incarnation == 3
    worker = FakeWorker(0, 16, 4, incarnation=3)
    result = worker.step(plan)
    stale = msgspec.structs.replace(result, incarnation=2)  # same step, the dead incarnation
    assert sched.update(plan, stale, 0.0) == []
    assert sched.schedule(0, 0.0) is None, "the real plan is still in flight"
    (out,) = sched.update(plan, result, 0.0)
    assert out.new_token_ids == reference_output(req)[:1]
    sched.add_worker(0, 16, 0.0, incarnation=4)  # a restart: the request is re-placed
    plan = sched.schedule(0, 0.0)
    assert plan.incarnation == 4 and [r.request_id for r in plan.new_requests] == ["a"]
    sched.check_integrity()


def test_tokens_in_the_workers_own_order_reach_their_requests():
    """``update`` matches tokens to requests by plan order first; a worker that answers in
    another order (or with tokens of requests aborted meanwhile) is matched by id."""
    sched, workers = setup(max_num_batched_tokens=8)
    reqs = [make_request(f"r{i}", prompt_len=3 + i, max_tokens=4 + i, seed=i) for i in range(4)]
    for r in reqs:
        sched.add(r, 0.0)
    out: dict[str, list[int]] = {}
    while sched.num_unfinished:
        plan = sched.schedule(0, 0.0)
        result = workers[0].step(plan)
        result.request_ids.reverse()
        result.token_ids.reverse()
        for o in sched.update(plan, result, 0.0):
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        sched.check_integrity()
        for rid, req in sched.requests.items():  # each token went to its own request
            assert req.output_token_ids == out.get(rid, [])
    for r in reqs:
        assert out[r.request_id] == reference_output(r)
