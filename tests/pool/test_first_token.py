"""The pool's first-token stamps (engine/pool/first_token.py): every request's first output
with tokens carries a ``PoolTiming`` whose stamps are in order and date the real events
(a clock that ticks on every read tells each read apart); no other output carries one; a
request that ends without a token (aborted, refused) is forgotten; a long prompt's earlier
chunks show as ``chunks``."""

from __future__ import annotations

import itertools

from fakes import FakeWorker, make_request, make_scheduler, reference_output

from engine.core import EngineCore, InProcess
from engine.messages import RequestOutput, StepPlan
from engine.pool.first_token import FirstTokenTimer

BLOCK = 4
BLOCKS = 64


def ticking() -> tuple[FirstTokenTimer, itertools.count[int]]:
    ticks = itertools.count(1)
    return FirstTokenTimer(lambda: float(next(ticks))), ticks


def test_each_first_token_carries_ordered_stamps_and_nothing_leaks() -> None:
    timer, ticks = ticking()
    core = EngineCore(make_scheduler(block_size=BLOCK, max_num_batched_tokens=16), timer)
    for w in (0, 1):
        core.add_worker(w, InProcess(FakeWorker(w, BLOCKS, BLOCK).step), BLOCKS, 0.0)
    # r0's 40-token prompt takes three 16-token steps: two chunks before its first token.
    reqs = [make_request("r0", prompt_len=40, max_tokens=3)] + [
        make_request(f"r{i}", prompt_len=6, max_tokens=3, seed=i) for i in range(1, 6)]
    for r in reqs:
        core.add(r, 0.0)
    core.add(make_request("gone", prompt_len=6, max_tokens=3, seed=9), 0.0)
    core.abort(["gone"], 0.0)  # aborted before any step: forgotten
    outputs: list[RequestOutput] = []
    while core.num_unfinished:
        assert core.step(0.0)
        batch = core.take_outputs()
        timer.on_flush(batch, float(next(ticks)))
        outputs += batch
    assert timer.num_pending == 0 and not timer.unsent
    tokens: dict[str, list[int]] = {}
    for o in outputs:
        first = o.request_id not in tokens and bool(o.new_token_ids)
        tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert (o.timing is not None) == first, o
        if o.timing is not None:
            t = o.timing
            assert t.arrived < t.scheduled <= t.step_sent < t.step_done < t.sent, t
            assert 1 <= t.step_requests <= 8 and 1 <= t.step_tokens <= 16
            # What its queue waited for: its worker's previous step (none for the first).
            assert t.prev_step_done == 0.0 or t.prev_step_sent < t.prev_step_done <= t.scheduled
            assert t.queue_steps >= 0
    assert {r.request_id: reference_output(r) for r in reqs} == {
        k: v for k, v in tokens.items() if k != "gone"}
    firsts = {o.request_id: o.timing for o in outputs if o.timing is not None}
    assert firsts["r0"] is not None and firsts["r0"].scheduled < firsts["r0"].step_sent
    short = firsts["r1"]
    assert short is not None and short.scheduled == short.step_sent  # one step: no chunks
    # Steps that ended while each waited: none for the first, more for the later ones (the
    # in-process worker's results are applied before the next worker is offered a step).
    order = sorted((t.scheduled, t.queue_steps) for t in firsts.values() if t is not None)
    assert order[0][1] == 0 and order[-1][1] >= 2
    assert [n for _, n in order] == sorted(n for _, n in order)


class Deferred:
    """A worker whose results come later (as the pool's sockets): nothing comes here."""

    def ready(self) -> bool:
        return True

    def submit(self, plan: StepPlan, now: float) -> None:
        return None


def test_requests_refused_or_failed_without_a_token_are_forgotten() -> None:
    timer, _ = ticking()
    core = EngineCore(make_scheduler(block_size=BLOCK, max_model_len=32), timer)
    core.add_worker(0, Deferred(), BLOCKS, 0.0)
    core.add(make_request("long", prompt_len=40, max_tokens=3), 0.0)  # past max_model_len
    assert [o.finish_reason for o in core.take_outputs()] == ["error"]
    assert timer.num_pending == 0
    core.add(make_request("a", prompt_len=6, max_tokens=2), 0.0)
    core.add(make_request("b", prompt_len=6, max_tokens=2, seed=1), 0.0)
    assert core.step(0.0) == 1 and timer.num_pending == 2
    plan = core.scheduler.in_flight(0)
    assert plan is not None and {rid for rid, _ in plan.scheduled()} == {"a", "b"}
    assert core.fail(0, plan.step_id, plan.incarnation, "boom", 0.0) is plan
    assert timer.num_pending == 0 and not timer.scheduled
