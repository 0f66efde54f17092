"""Prefix caching: exact hits, LRU eviction tail-first, collisions never return wrong KV."""

from __future__ import annotations

import pytest
from fakes import FakeWorker, make_request, make_scheduler, reference_output, run_to_completion
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.scheduler import block_manager as bm
from engine.scheduler.block_manager import BlockManager, TokenTuple
from engine.scheduler.request import Request


def hashes_of(tokens, bs=4, extra=""):
    out, parent = [], bm.ROOT_HASH
    for i in range(len(tokens) // bs):
        parent = bm.chain_hash(parent, tuple(tokens[i * bs:(i + 1) * bs]), extra)
        out.append(parent)
    return out


def cache_sequence(mgr: BlockManager, tokens, extra=""):
    """Allocate, 'compute' and register a sequence's full blocks, then release them."""
    bs = mgr.block_size
    blocks = mgr.allocate(-(-len(tokens) // bs))
    parent = -1
    for i, h in enumerate(hashes_of(tokens, bs, extra)):
        parent = mgr.register(blocks[i], h, parent, tuple(tokens[i * bs:(i + 1) * bs]), extra)
        if parent is None:  # the hash is taken by other content: stop caching this chain
            break
    mgr.free(blocks)
    return blocks


def test_repeated_prompt_hits_every_full_block():
    mgr = BlockManager(16, 4)
    tokens = list(range(100, 114))  # 3 full blocks + 2 tokens
    blocks = cache_sequence(mgr, tokens)
    hit = mgr.match_prefix(hashes_of(tokens), TokenTuple(tokens))
    assert hit == blocks[:3]
    mgr.check_integrity([])
    # Diverging in the second block: only the first hits.
    other = [*tokens[:5], 999, *tokens[6:]]
    assert mgr.match_prefix(hashes_of(other), TokenTuple(other)) == blocks[:1]
    # A different salt (tenant isolation) never hits.
    assert mgr.match_prefix(hashes_of(tokens, extra="tenant-b"), TokenTuple(tokens), "tenant-b") == []


def test_eviction_takes_least_recently_used_blocks_tail_first():
    mgr = BlockManager(6, 4)
    a = cache_sequence(mgr, list(range(0, 8)))  # 2 blocks, freed first
    b = cache_sequence(mgr, list(range(50, 58)))  # 2 blocks, freed later
    assert mgr.num_cached_blocks == 4
    # 2 never-used blocks go first, then A's tail, then A's head; B survives.
    taken = mgr.allocate(3)
    assert taken[2] == a[1]
    assert mgr.match_prefix(hashes_of(list(range(0, 8))), TokenTuple(range(0, 8))) == [a[0]]
    taken += mgr.allocate(1)
    assert taken[3] == a[0]
    assert mgr.match_prefix(hashes_of(list(range(50, 58))), TokenTuple(range(50, 58))) == b
    # A hit refreshes recency: B's blocks are touched, so new pressure evicts nothing else first.
    mgr.acquire(b)
    mgr.free(b)
    mgr.free(taken)
    mgr.check_integrity([])


def test_reallocated_parent_invalidates_its_children():
    mgr = BlockManager(4, 2)
    tokens = [1, 2, 3, 4]
    blocks = cache_sequence(mgr, tokens)
    # Evict only the head block: the child still caches, but its parent's content is gone.
    mgr._free.move_to_end(blocks[0], last=False)
    (taken,) = [b for b in mgr.allocate(1)]
    assert taken == blocks[0]
    assert mgr.match_prefix(hashes_of(tokens, 2), TokenTuple(tokens)) == []
    mgr.free([taken])
    mgr.check_integrity([])


@settings(max_examples=50, deadline=None)
@given(seqs=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=8))
def test_a_hit_never_returns_blocks_whose_tokens_differ(monkeypatch_hash, seqs):
    """With every hash colliding, hits still only come back for identical prefixes."""
    mgr = BlockManager(64, 2)
    for tokens in seqs:
        hit = mgr.match_prefix(hashes_of(tokens, 2), TokenTuple(tokens))
        for i, b in enumerate(hit):
            assert mgr._key[b][2] == tuple(tokens[i * 2:(i + 1) * 2])
        if mgr.num_free_blocks >= len(tokens):
            cache_sequence(mgr, tokens)
        mgr.check_integrity([])


@pytest.fixture(scope="module")
def monkeypatch_hash():
    original = bm.chain_hash
    bm.chain_hash = lambda parent, tokens, extra="": 42  # every block collides
    yield
    bm.chain_hash = original


def test_scheduler_reuses_a_finished_requests_prefix():
    sched = make_scheduler(block_size=4, placement="least-loaded")
    worker = FakeWorker(0, 64, 4)
    sched.add_worker(0, 64, 0.0)
    shared = tuple(range(300, 320))  # 5 full blocks
    first = make_request("a", prompt_len=3, max_tokens=4, prefix=shared, seed=1)
    sched.add(first, 0.0)
    out = run_to_completion(sched, {0: worker})
    second = make_request("b", prompt_len=2, max_tokens=4, prefix=shared, seed=2)
    sched.add(second, 0.0)
    plan = sched.schedule(0, 0.0)
    (nr,) = plan.new_requests
    assert nr.num_computed_tokens == 20  # every full block of the shared prefix
    outs = sched.update(plan, worker.step(plan), 0.0)
    assert outs[0].num_cached_tokens == 20
    rest = run_to_completion(sched, {0: worker})
    assert out["a"] == reference_output(first)
    assert outs[0].new_token_ids + rest["b"] == reference_output(second)
    assert sched.stats().prefix_hit_tokens == 20


def test_identical_prompt_recomputes_only_its_last_token_block():
    sched = make_scheduler(block_size=4)
    worker = FakeWorker(0, 64, 4)
    sched.add_worker(0, 64, 0.0)
    req = make_request("a", prompt_len=12, max_tokens=2)
    sched.add(req, 0.0)
    run_to_completion(sched, {0: worker})
    sched.add(make_request("b", prompt_len=12, max_tokens=2), 0.0)
    plan = sched.schedule(0, 0.0)
    # 12 tokens = 3 full blocks; at least one token must run to get logits, so 2 blocks hit.
    assert plan.new_requests[0].num_computed_tokens == 8
    assert plan.new_requests[0].num_scheduled_tokens == 4


def test_preempted_request_resumes_from_its_cached_blocks():
    sched = make_scheduler(block_size=4, max_num_batched_tokens=64)
    worker = FakeWorker(0, 10, 4)
    sched.add_worker(0, 10, 0.0)
    reqs = [make_request(f"r{i}", prompt_len=12, max_tokens=14, seed=i) for i in range(2)]
    for r in reqs:
        sched.add(r, 0.0)
    resumed_with_hits = False
    out: dict[str, list[int]] = {}
    while sched.num_unfinished:
        plan = sched.schedule(0, 0.0)
        resumed_with_hits |= any(n.num_computed_tokens > 0 for n in plan.new_requests)
        for o in sched.update(plan, worker.step(plan), 0.0):
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        sched.check_integrity()
    assert sched.num_preemptions > 0 and resumed_with_hits
    for r in reqs:
        assert out[r.request_id] == reference_output(r)


def test_a_workers_prefix_answer_follows_every_change_of_its_cache():
    """``cached_prefix_tokens`` keeps its last answer only while the cache is unchanged."""
    sched = make_scheduler(block_size=4)
    worker = FakeWorker(0, 16, 4)
    sched.add_worker(0, 16, 0.0)
    ws = sched.workers[0]
    shared = tuple(range(300, 312))  # 3 full blocks
    req = Request(make_request("probe", prompt_len=2, prefix=shared, seed=5), 256)
    assert ws.cached_prefix_tokens(req) == 0
    sched.add(make_request("a", prompt_len=1, max_tokens=2, prefix=shared, seed=1), 0.0)
    plan = sched.schedule(0, 0.0)  # allocates the blocks of "a"
    assert ws.cached_prefix_tokens(req) == 0
    sched.update(plan, worker.step(plan), 0.0)  # registers them, full of the shared prefix
    assert ws.cached_prefix_tokens(req) == 12
    run_to_completion(sched, {0: worker})  # "a" lets go: its blocks stay cached, evictable
    ws.blocks.allocate(ws.blocks.num_free_blocks)  # evicts every cached block
    assert ws.cached_prefix_tokens(req) == 0
