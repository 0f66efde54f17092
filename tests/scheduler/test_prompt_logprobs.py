"""Prompt logprobs and ``max_tokens`` 0 in the scheduler: every prompt position is scored
and sent exactly once, before the first token, whatever chunking, prefix cache and
preemption do; a ``max_tokens`` 0 request runs its prefill only."""

from __future__ import annotations

import msgspec
import pytest
from fakes import FakeWorker, make_request, make_scheduler, prompt_logprob, reference_output

from engine.messages import EngineRequest, RequestOutput, StepPlan
from engine.scheduler.request import Request
from engine.scheduler.scheduler import Scheduler


def with_prompt_logprobs(req: EngineRequest, k: int = 2, max_tokens: int | None = None):
    s = msgspec.structs.replace(req.sampling, prompt_logprobs=k)
    if max_tokens is not None:
        s = msgspec.structs.replace(s, max_tokens=max_tokens)
    return msgspec.structs.replace(req, sampling=s)


def drive(sched: Scheduler, worker: FakeWorker) -> tuple[list[RequestOutput], list[StepPlan]]:
    """Run to the end on worker 0; every output and plan, in order."""
    outs: list[RequestOutput] = []
    plans: list[StepPlan] = []
    for _ in range(10_000):
        if sched.num_unfinished == 0:
            return outs, plans
        plan = sched.schedule(0, 0.0)
        sched.check_integrity()
        assert plan is not None, "scheduler stalled"
        plans.append(plan)
        outs += sched.update(plan, worker.step(plan), 0.0)
        outs += sched.drain_outputs()
        sched.check_integrity()
    raise AssertionError("did not finish")


def prompt_rows(outs: list[RequestOutput], rid: str) -> list[tuple[int, float]]:
    """(prompt token index, logprob) as sent for ``rid``, in order; checks they all come
    before its first token."""
    rows: list[tuple[int, float]] = []
    seen_token = False
    for o in outs:
        if o.request_id != rid:
            continue
        if o.prompt_logprobs is not None:
            assert not seen_token, "prompt logprobs after the first token"
            pl = o.prompt_logprobs
            rows += [(pl.first + j, lp) for j, lp in enumerate(pl.token_logprobs)]
        seen_token = seen_token or bool(o.new_token_ids)
    return rows


def expected_rows(req: EngineRequest) -> list[tuple[int, float]]:
    p = req.prompt_token_ids
    return [(i, prompt_logprob(p, i)) for i in range(1, len(p))]


def test_chunked_prefill_sends_every_position_once_before_the_first_token():
    sched = make_scheduler(max_num_batched_tokens=7)
    worker = FakeWorker(0, 64, 4)
    sched.add_worker(0, 64, 0.0)
    req = with_prompt_logprobs(make_request("a", prompt_len=30, max_tokens=3))
    sched.add(req, 0.0)
    outs, plans = drive(sched, worker)
    assert len(plans) >= 5  # the prompt ran in chunks
    assert prompt_rows(outs, "a") == expected_rows(req)
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == reference_output(req)


def test_max_tokens_zero_runs_the_prefill_only():
    sched = make_scheduler(max_num_batched_tokens=8)
    worker = FakeWorker(0, 32, 4)
    sched.add_worker(0, 32, 0.0)
    req = with_prompt_logprobs(make_request("a", prompt_len=13), max_tokens=0)
    plain = msgspec.structs.replace(make_request("b", prompt_len=5, seed=3),
                                    sampling=msgspec.structs.replace(
                                        make_request("b").sampling, max_tokens=0))
    sched.add(req, 0.0)
    sched.add(plain, 0.0)
    outs, _ = drive(sched, worker)
    finals = {o.request_id: o for o in outs if o.finish_reason is not None}
    assert finals["a"].finish_reason == "length" and finals["b"].finish_reason == "length"
    assert finals["a"].num_prompt_tokens == 13
    assert all(not o.new_token_ids for o in outs)  # the token sampled at the end is dropped
    assert prompt_rows(outs, "a") == expected_rows(req)
    assert prompt_rows(outs, "b") == []
    assert sched.workers[0].blocks.num_free_blocks == 32


def test_cached_prefix_is_recomputed_for_prompt_logprobs_only():
    sched = make_scheduler(max_num_batched_tokens=64)
    worker = FakeWorker(0, 64, 4)
    sched.add_worker(0, 64, 0.0)
    warm = make_request("warm", prompt_len=20, max_tokens=1, seed=5)
    sched.add(warm, 0.0)
    drive(sched, worker)
    scored = with_prompt_logprobs(make_request("scored", prompt_len=20, max_tokens=2, seed=5))
    again = make_request("again", prompt_len=20, max_tokens=2, seed=5)
    assert scored.prompt_token_ids == warm.prompt_token_ids
    sched.add(scored, 0.0)
    sched.add(again, 0.0)
    outs, plans = drive(sched, worker)
    new = {n.request_id: n for p in plans for n in p.new_requests}
    assert new["scored"].num_computed_tokens == 0  # every position it scores is computed
    assert new["again"].num_computed_tokens == 16  # others still hit the cache
    firsts = {o.request_id: o for o in outs if o.new_token_ids and o.num_prompt_tokens}
    assert firsts["scored"].num_cached_tokens == 0
    assert prompt_rows(outs, "scored") == expected_rows(scored)
    assert [t for o in outs if o.request_id == "scored" for t in o.new_token_ids] == \
        reference_output(scored)


def test_preemption_after_scoring_does_not_resend_and_may_use_the_cache():
    # As test_preemption_when_blocks_run_out: 12 blocks cannot hold three growing requests.
    sched = make_scheduler(max_num_batched_tokens=64)
    worker = FakeWorker(0, 12, 4)
    sched.add_worker(0, 12, 0.0)
    reqs = [with_prompt_logprobs(make_request(f"r{i}", prompt_len=8, max_tokens=20, seed=i))
            for i in range(3)]
    for r in reqs:
        sched.add(r, 0.0)
    outs, plans = drive(sched, worker)
    assert sched.num_preemptions > 0
    resumed = [n for p in plans for n in p.new_requests if n.num_output_tokens > 0]
    assert resumed, "no request was resumed"
    for n in resumed:  # scored already: the runner is not asked again
        assert n.sampling.prompt_logprobs is None
    for r in reqs:
        assert prompt_rows(outs, r.request_id) == expected_rows(r)
        assert [t for o in outs if o.request_id == r.request_id for t in o.new_token_ids] == \
            reference_output(r)


@pytest.mark.parametrize("num_blocks,high_len,mid_prompt", [(10, 16, True), (12, 12, False)])
def test_preempted_by_priority_mid_prompt_or_after_scoring(num_blocks: int, high_len: int,
                                                          mid_prompt: bool):
    """A low-priority prompt being scored in chunks is preempted by a high-priority request.
    Mid-prompt, it resumes after the cached blocks before its first unsent position, still
    scoring; after its prompt was scored, it resumes from the whole cached prefix and the
    runner is asked for no prompt logprobs. Either way each position is sent once."""
    sched = make_scheduler(max_num_batched_tokens=8, policy="priority")
    worker = FakeWorker(0, num_blocks, 4)
    sched.add_worker(0, num_blocks, 0.0)
    low = with_prompt_logprobs(make_request("low", prompt_len=30, max_tokens=4))
    sched.add(low, 0.0)
    outs: list[RequestOutput] = []
    plans: list[StepPlan] = []
    for _ in range(2):  # 16 of its 30 prompt tokens
        plan = sched.schedule(0, 0.0)
        assert plan is not None
        plans.append(plan)
        outs += sched.update(plan, worker.step(plan), 0.0)
    sched.add(make_request("high", prompt_len=high_len, max_tokens=8, priority=5, seed=9), 0.0)
    more_outs, more_plans = drive(sched, worker)
    outs += more_outs
    plans += more_plans
    assert sched.num_preemptions > 0
    resumed = [n for p in plans for n in p.new_requests if n.request_id == "low"][1:]
    assert resumed and resumed[0].num_computed_tokens > 0  # the cache served what it could
    if mid_prompt:
        assert resumed[0].num_output_tokens == 0 and resumed[0].sampling.prompt_logprobs == 2
    else:
        assert resumed[0].num_output_tokens > 0 and resumed[0].sampling.prompt_logprobs is None
    assert prompt_rows(outs, "low") == expected_rows(low)
    assert [t for o in outs if o.request_id == "low" for t in o.new_token_ids] == \
        reference_output(low)


def test_a_request_owed_prompt_logprobs_resumes_no_later_than_its_first_unsent_position():
    req = Request(with_prompt_logprobs(make_request("a", prompt_len=30)), 256)
    assert req.max_cached_blocks(4) == 0  # nothing sent yet: no cached block may be used
    req.next_prompt_logprob = 9  # tokens 1..8 sent: position 8 scores the next one
    assert req.max_cached_blocks(4) == 2
    req.next_prompt_logprob = 30  # all sent
    assert req.max_cached_blocks(4) == (30 - 1) // 4
    plain = Request(make_request("b", prompt_len=30), 256)
    assert plain.max_cached_blocks(4) == (30 - 1) // 4
