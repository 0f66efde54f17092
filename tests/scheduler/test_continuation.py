"""Continuations: a request resubmitted to a new pool after its pool died, carrying the tokens
it already produced (``EngineRequest.output_token_ids``). The new scheduler admits it as a
preempted request resuming: the outputs count for max_tokens, min_tokens and stops, the
worker gets them as outputs (the sampler's seeded position, penalties, grammar replay), and
prompt logprobs are not sent again. Greedy: first run plus continuation equals one
uninterrupted run, token for token."""

from __future__ import annotations

import msgspec
import pytest
from fakes import FakeWorker, make_request, make_scheduler, reference_output, run_to_completion

from engine.core import EngineCore, InProcess, IntegrityCheck
from engine.messages import EngineRequest, SamplingParams


def _pool(num_workers: int = 1, num_blocks: int = 64, block_size: int = 4, **kw):
    sched = make_scheduler(block_size=block_size, **kw)
    workers = {w: FakeWorker(w, num_blocks, block_size) for w in range(num_workers)}
    for w in workers:
        sched.add_worker(w, num_blocks, now=0.0)
    return sched, workers


def _run_until(sched, workers, reqs: list[EngineRequest], num_outputs: dict[str, int]):
    """Step the pool until each request produced ``num_outputs[id]`` tokens (or ended); return
    each one's tokens so far. Requests that reach their count are aborted there: the pool
    died with them."""
    for r in reqs:
        assert sched.add(r, 0.0) == []
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    ended: set[str] = set()
    core = EngineCore(sched, IntegrityCheck(sched),
                      handles={w: InProcess(worker.step) for w, worker in workers.items()})
    for _ in range(1000):
        done = [rid for rid, toks in got.items()
                if rid not in ended and len(toks) >= num_outputs[rid]]
        core.abort(done, 0.0)
        ended.update(done)
        if sched.num_unfinished == 0:
            return got
        core.step(0.0)
        for o in core.take_outputs():
            if o.request_id not in ended:
                got[o.request_id] += o.new_token_ids
                if o.finish_reason is not None:
                    ended.add(o.request_id)
    raise AssertionError("did not stop")


def _continuation(req: EngineRequest, outputs: list[int]) -> EngineRequest:
    return msgspec.structs.replace(req, output_token_ids=tuple(outputs))


def test_continuations_on_a_new_pool_complete_the_uninterrupted_output() -> None:
    reqs = [make_request(f"r{i}", prompt_len=5 + i, max_tokens=6 + i % 3, seed=i,
                         prefix=(7, 7, 7, 7) if i % 2 else ()) for i in range(8)]
    cut = {r.request_id: i % (r.sampling.max_tokens) for i, r in enumerate(reqs)}  # 0..max-1
    old, old_workers = _pool(num_workers=2)
    before = _run_until(old, old_workers, reqs, cut)
    new, new_workers = _pool(num_workers=2)  # the restarted pool: fresh workers, empty KV
    for r in reqs:
        assert new.add(_continuation(r, before[r.request_id]), 0.0) == []
    after = run_to_completion(new, new_workers)
    for r in reqs:
        assert before[r.request_id] + after.get(r.request_id, []) == reference_output(r)
    assert all(ws.blocks.num_free_blocks == 64 for ws in new.workers.values())


def test_continuation_reaches_the_worker_as_a_request_with_outputs() -> None:
    req = make_request("r", prompt_len=6, max_tokens=8)
    req = msgspec.structs.replace(req, sampling=msgspec.structs.replace(
        req.sampling, prompt_logprobs=2, seed=5))
    ref = reference_output(req)
    sched, _ = _pool()
    sched.add(_continuation(req, ref[:3]), 0.0)
    plan = sched.schedule(0, 0.0)
    assert plan is not None
    (new,) = plan.new_requests
    assert new.token_ids == [*req.prompt_token_ids, *ref[:3]]
    assert new.num_output_tokens == 3  # the seeded sampler's position, penalties, grammar
    assert new.sampling.prompt_logprobs is None  # the client has them already
    assert new.sampling.max_tokens == 8 and new.sampling.seed == 5  # the original params


def test_outputs_count_for_max_tokens_and_the_context() -> None:
    req = make_request("r", prompt_len=6, max_tokens=5)
    ref = reference_output(req)
    sched, workers = _pool()
    sched.add(_continuation(req, ref[:3]), 0.0)
    out = run_to_completion(sched, workers)
    assert out["r"] == ref[3:5]
    # max_model_len bounds prompt plus every output, the continuation's included
    sched, workers = _pool(max_model_len=10)
    sched.add(_continuation(req, ref[:2]), 0.0)
    assert run_to_completion(sched, workers)["r"] == ref[2:4]


def _finishes(sched, workers) -> dict[str, str | None]:
    reasons: dict[str, str | None] = {}
    while sched.num_unfinished:
        plan = sched.schedule(0, 0.0)
        assert plan is not None
        for o in sched.update(plan, workers[0].step(plan), 0.0):
            reasons[o.request_id] = o.finish_reason
    return reasons


def test_min_tokens_and_stop_tokens_count_the_outputs() -> None:
    probe = make_request("p", prompt_len=6, max_tokens=10)
    ref = reference_output(probe)
    # ref[1] stops the request, but only once min_tokens outputs exist: not at the 2nd
    # token when min_tokens is 4. A continuation holding ref[:2] must not stop at once, and
    # must stop at the first later ref[1] (or run to max_tokens) as the uninterrupted run.
    req = msgspec.structs.replace(probe, eos_token_ids=(ref[1],), sampling=msgspec.structs.replace(
        probe.sampling, min_tokens=4))
    sched, workers = _pool()
    sched.add(req, 0.0)
    whole = run_to_completion(sched, workers)["p"]
    assert whole[:2] == ref[:2] and len(whole) > 2
    sched, workers = _pool()
    assert sched.add(_continuation(req, ref[:2]), 0.0) == []
    assert ref[:2] + run_to_completion(sched, workers)["p"] == whole
    # stop_token_ids count alike
    req2 = msgspec.structs.replace(probe, sampling=msgspec.structs.replace(
        probe.sampling, stop_token_ids=(ref[4],)))
    sched, workers = _pool()
    sched.add(_continuation(req2, ref[:3]), 0.0)
    assert _finishes(sched, workers) == {"p": "stop"}


@pytest.mark.parametrize(("outputs", "reason"), [
    ("stop_last", "stop"), ("all", "length")])
def test_a_continuation_whose_outputs_already_end_it_finishes_at_once(
        outputs: str, reason: str) -> None:
    probe = make_request("p", prompt_len=6, max_tokens=4)
    ref = reference_output(probe)
    req = msgspec.structs.replace(probe, eos_token_ids=(ref[1],))
    done = ref[:2] if outputs == "stop_last" else ref[:4]
    sched, _ = _pool()
    (out,) = sched.add(_continuation(req if outputs == "stop_last" else probe, done), 0.0)
    assert (out.finish_reason, out.new_token_ids, out.error) == (reason, [], "")
    assert sched.num_unfinished == 0


def test_a_continuation_beyond_the_context_is_an_error() -> None:
    req = EngineRequest(request_id="r", prompt_token_ids=(1, 2, 3, 4),
                        sampling=SamplingParams(max_tokens=20, temperature=0.0),
                        output_token_ids=tuple(range(10)))
    sched, _ = _pool(max_model_len=12)
    (out,) = sched.add(req, 0.0)
    assert out.finish_reason == "error" and "context" in out.error


def test_a_continuation_reuses_the_prefix_cache_of_its_outputs() -> None:
    """Two continuations of requests sharing a prompt and outputs: the second finds the
    first's blocks, outputs included (they are part of its token chain)."""
    req = make_request("a", prompt_len=8, max_tokens=12)
    ref = reference_output(req)
    sched, workers = _pool()
    sched.add(_continuation(req, ref[:8]), 0.0)
    run_to_completion(sched, workers)
    twin = msgspec.structs.replace(req, request_id="b", output_token_ids=tuple(ref[:8]))
    sched.add(twin, 0.0)
    plan = sched.schedule(0, 0.0)
    assert plan is not None and plan.new_requests[0].num_computed_tokens == 12  # 16 known
    first = [t for o in sched.update(plan, workers[0].step(plan), 0.0) for t in o.new_token_ids]
    assert ref[:8] + first + run_to_completion(sched, workers).get("b", []) == ref
