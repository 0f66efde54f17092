"""Property-based: random add / abort / schedule / update / worker death over several workers."""

from __future__ import annotations

from fakes import FakeWorker, make_request, make_scheduler, reference_output
from hypothesis import given, settings
from hypothesis import strategies as st

PREFIXES = [(), tuple(range(500, 509)), tuple(range(600, 616)), tuple(range(500, 513))]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12)),
        st.tuples(st.just("add-shared"), st.integers(0, 3), st.integers(1, 12)),
        st.tuples(st.just("abort"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("step"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("kill"), st.integers(0, 2), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=80, deadline=None)
@given(ops=ops, num_blocks=st.integers(6, 24), budget=st.integers(1, 32), cap=st.integers(1, 6),
       policy=st.sampled_from(["fcfs", "priority", "sjf", "fair", "lpm"]),
       placement=st.sampled_from(["cache-aware", "least-loaded", "round-robin"]))
def test_invariants_hold_and_nothing_leaks(ops, num_blocks, budget, cap, policy, placement):
    sched = make_scheduler(max_num_batched_tokens=budget, max_num_seqs=cap, block_size=4,
                           policy=policy, placement=placement)
    workers = {w: FakeWorker(w, num_blocks, 4) for w in range(3)}
    for w in workers:
        sched.add_worker(w, num_blocks, 0.0)
    added, aborted, finished = {}, set(), {}
    outputs: dict[str, list[int]] = {}

    def collect(outs):
        for o in outs:
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason:
                assert o.request_id not in finished, "finished twice"
                finished[o.request_id] = o.finish_reason

    def step(w):
        plan = sched.schedule(w, 0.0)
        if plan is not None:
            assert plan.num_scheduled_tokens <= budget and plan.num_requests <= cap
            collect(sched.update(plan, workers[w].step(plan), 0.0))
        collect(sched.drain_outputs())

    for i, (op, a, b) in enumerate(ops):
        if op in ("add", "add-shared"):
            if op == "add":
                req = make_request(f"r{i}", prompt_len=a, max_tokens=b, seed=i, priority=i % 3 - 1,
                                   tenant=f"t{i % 2}")
            else:  # a shared prefix, then a short distinct tail (or none)
                req = make_request(f"r{i}", prompt_len=i % 3, max_tokens=b, seed=i,
                                   prefix=PREFIXES[a] or (7,), priority=i % 3 - 1)
            added[req.request_id] = req
            collect(sched.add(req, 0.0))
        elif op == "abort" and added:
            rid = sorted(added)[a % len(added)]
            aborted.add(rid)
            collect(sched.abort([rid], 0.0))
        elif op == "step":
            step(a)
        elif op == "kill":
            sched.remove_worker(a, 0.0)
            workers[a] = FakeWorker(a, num_blocks, 4)
            sched.add_worker(a, num_blocks, 0.0)
        sched.check_integrity()

    for _ in range(5000):  # drain: every request finishes or was aborted
        if not sched.num_unfinished:
            break
        for w in workers:
            step(w)
        sched.check_integrity()
    assert sched.num_unfinished == 0
    assert set(finished) == set(added)
    for rid, req in added.items():
        if finished[rid] in ("stop", "length") and rid not in aborted:
            ref = reference_output(req)
            assert outputs[rid] == ref[: len(outputs[rid])], "a token was emitted twice or changed"
    for ws in sched.workers.values():
        assert ws.blocks.num_free_blocks == num_blocks, "a block leaked"
