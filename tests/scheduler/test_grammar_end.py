"""A worker that reports a request's grammar ended (``StepResult.grammar_ended_ids``) makes
the scheduler finish it with "stop" at once, whatever its EOS or token budget says."""

from __future__ import annotations

import msgspec
from fakes import FakeWorker, make_request, make_scheduler


def test_grammar_end_finishes_with_stop() -> None:
    sched = make_scheduler()
    worker = FakeWorker(0, 64, sched.block_size)
    sched.add_worker(0, 64, 0.0)
    ended = make_request("ended", max_tokens=20, seed=1)  # no EOS: only the grammar stops it
    other = make_request("other", max_tokens=4, seed=2)
    for r in (ended, other):
        assert not sched.add(r, 0.0)
    reasons: dict[str, str | None] = {}
    counts = {"ended": 0, "other": 0}
    now = 0.0
    while sched.num_unfinished:
        now += 1
        plan = sched.schedule(0, now)
        assert plan is not None
        result = worker.step(plan)
        if counts["ended"] == 2 and "ended" in result.request_ids:  # its third token
            result = msgspec.structs.replace(result, grammar_ended_ids=["ended"])
        for o in sched.update(plan, result, now):
            counts[o.request_id] += len(o.new_token_ids)
            reasons[o.request_id] = o.finish_reason
        sched.check_integrity()
    assert counts == {"ended": 3, "other": 4}
    assert reasons == {"ended": "stop", "other": "length"}
