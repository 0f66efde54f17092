"""KV events: vLLM's wire format, the scheduler's events against its own prefix cache, and
the publisher's sockets (sequence numbers, replay)."""

from __future__ import annotations

import random
import time

import msgspec
import pytest
import zmq
from fakes import FakeWorker, make_request
from vllm.distributed import kv_events as vllm_events

from engine.cli import config_from_args
from engine.config import ConfigError, KVEventsConfig, SchedulerConfig, parse_kv_events_config
from engine.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventPublisher,
    pool_endpoint,
    to_wire_events,
)
from engine.messages import EngineRequest, SamplingParams
from engine.scheduler.block_manager import ROOT_HASH, chain_hash
from engine.scheduler.scheduler import Scheduler

VLLM_DECODER = msgspec.msgpack.Decoder(type=vllm_events.KVEventBatch)
U64 = (1 << 64) - 1


def signed(h: int) -> int:
    return h - (1 << 64) if h >= 1 << 63 else h


# --------------------------------------------------------------------------- wire format


def test_batches_encode_byte_for_byte_as_vllm_and_decode_with_its_classes():
    ours = KVEventBatch(ts=12.5, data_parallel_rank=3, events=[
        BlockStored(block_hashes=[1, U64], parent_block_hash=None, token_ids=[5, 6, 7, 8],
                    block_size=2, lora_id=None, medium="GPU", lora_name=None),
        BlockStored(block_hashes=[9], parent_block_hash=U64, token_ids=[1, 2], block_size=2,
                    lora_id=None, medium="GPU", lora_name=None, extra_keys=[("salt",)]),
        BlockRemoved(block_hashes=[1, 9], medium="GPU"),
        AllBlocksCleared()])
    theirs = vllm_events.KVEventBatch(ts=12.5, data_parallel_rank=3, events=[
        vllm_events.BlockStored(block_hashes=[1, U64], parent_block_hash=None,
                                token_ids=[5, 6, 7, 8], block_size=2, lora_id=None,
                                medium="GPU", lora_name=None),
        vllm_events.BlockStored(block_hashes=[9], parent_block_hash=U64, token_ids=[1, 2],
                                block_size=2, lora_id=None, medium="GPU", lora_name=None,
                                extra_keys=[("salt",)]),
        vllm_events.BlockRemoved(block_hashes=[1, 9], medium="GPU"),
        vllm_events.AllBlocksCleared()])
    payload = msgspec.msgpack.encode(ours)
    assert payload == msgspec.msgpack.encode(theirs)
    decoded = VLLM_DECODER.decode(payload)
    assert decoded.data_parallel_rank == 3 and decoded.ts == 12.5
    assert [type(e).__name__ for e in decoded.events] == [
        "BlockStored", "BlockStored", "BlockRemoved", "AllBlocksCleared"]
    assert decoded.events[1].extra_keys == [("salt",)]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(theirs), type=KVEventBatch) == ours


def test_raw_events_group_into_chains_and_runs_of_removals():
    raw = [(2,), (0, 10, None, (1, 2), ""), (0, 11, 10, (3, 4), ""), (0, 12, 99, (5, 6), ""),
           (1, 10), (1, -1), (0, 13, 12, (7, 8), "s")]
    events = to_wire_events(raw, 2)
    assert events == [
        AllBlocksCleared(),
        BlockStored(block_hashes=[10, 11], parent_block_hash=None, token_ids=[1, 2, 3, 4],
                    block_size=2, lora_id=None, medium="GPU", lora_name=None),
        BlockStored(block_hashes=[12], parent_block_hash=99, token_ids=[5, 6], block_size=2,
                    lora_id=None, medium="GPU", lora_name=None),
        BlockRemoved(block_hashes=[10, U64], medium="GPU"),
        BlockStored(block_hashes=[13], parent_block_hash=12, token_ids=[7, 8], block_size=2,
                    lora_id=None, medium="GPU", lora_name=None, extra_keys=[("s",)])]


# --------------------------------------------------------------------------- scheduler


class Index:
    """What a router rebuilds from the events: per worker, block hash -> parent hash."""

    def __init__(self) -> None:
        self.blocks: dict[int, dict[int, int | None]] = {}
        self.orphans = 0  # stores whose parent the index did not hold
        self.num_removed = 0

    def apply(self, worker_id: int, payload: bytes, block_size: int) -> None:
        batch = VLLM_DECODER.decode(payload)
        assert batch.data_parallel_rank == worker_id
        held = self.blocks.setdefault(worker_id, {})
        for ev in batch.events:
            if isinstance(ev, vllm_events.AllBlocksCleared):
                held.clear()
            elif isinstance(ev, vllm_events.BlockRemoved):
                for h in ev.block_hashes:
                    assert h in held, f"removed {h} never stored"
                    del held[h]
                    self.num_removed += 1
            else:
                assert ev.block_size == block_size
                assert len(ev.token_ids) == block_size * len(ev.block_hashes)
                parent = ev.parent_block_hash
                self.orphans += parent is not None and parent not in held
                for i, h in enumerate(ev.block_hashes):
                    tokens = tuple(ev.token_ids[i * block_size:(i + 1) * block_size])
                    extra = ev.extra_keys[i][0] if ev.extra_keys else ""
                    # The chain is consistent: each hash follows from its parent and tokens.
                    expected = chain_hash(ROOT_HASH if parent is None else signed(parent),
                                          tokens, extra)
                    assert h == expected & U64
                    assert h not in held, f"stored {h} twice"
                    held[h] = parent
                    parent = h


def drain_into(sched: Scheduler, index: Index, encoder: msgspec.msgpack.Encoder) -> None:
    for w, raw in sched.drain_kv_events():
        batch = KVEventBatch(ts=0.0, events=to_wire_events(raw, sched.block_size),
                             data_parallel_rank=w)
        index.apply(w, encoder.encode(batch), sched.block_size)


def cached_hashes(sched: Scheduler, worker_id: int) -> set[int]:
    return {h & U64 for h in sched.workers[worker_id].blocks._cached}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_events_rebuild_every_workers_prefix_cache_exactly(seed):
    """Shared prefixes on two workers with few blocks (evictions), a salted tenant, a worker
    that dies: after every scheduler call the index built from the events equals each
    worker's prefix cache, so a block is announced before any request can hit it."""
    rng = random.Random(seed)
    cfg = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4)
    sched = Scheduler(cfg, block_size=4, max_model_len=256, kv_events=True)
    workers = {w: FakeWorker(w, 24, 4) for w in (0, 1)}
    for w in workers:
        sched.add_worker(w, 24, 0.0)
    index, enc = Index(), msgspec.msgpack.Encoder()
    prefixes = [tuple(rng.randrange(1000) for _ in range(12)) for _ in range(3)]
    n = 0
    for step in range(300):
        if rng.random() < 0.3:
            sched.add(make_request(f"r{n}", prompt_len=rng.randrange(1, 10), seed=n,
                                   max_tokens=rng.randrange(1, 12),
                                   prefix=rng.choice(prefixes), salt=rng.choice(["", "", "t"])),
                      0.0)
            n += 1
        if step == 150:  # worker 1 dies and comes back empty
            sched.remove_worker(1, 0.0)
            drain_into(sched, index, enc)
            assert index.blocks[1] == {}
            sched.add_worker(1, 24, 0.0)
            workers[1] = FakeWorker(1, 24, 4)
        for w, worker in workers.items():
            plan = sched.schedule(w, 0.0)
            drain_into(sched, index, enc)
            assert set(index.blocks[w]) == cached_hashes(sched, w)
            if plan is not None:
                for new in plan.new_requests:  # every hit is a block the index holds
                    hit = new.block_ids[:new.num_computed_tokens // 4]
                    blocks = sched.workers[w].blocks
                    assert {blocks._hash[b] & U64 for b in hit} <= set(index.blocks[w])
                sched.update(plan, worker.step(plan), 0.0)
                drain_into(sched, index, enc)
                assert set(index.blocks[w]) == cached_hashes(sched, w)
            sched.check_integrity()
    assert index.num_removed > 20 and n > 50  # the run exercised evictions


def test_no_events_are_recorded_when_disabled():
    sched = Scheduler(SchedulerConfig(), block_size=4, max_model_len=256)
    sched.add_worker(0, 16, 0.0)
    sched.add(make_request("a", prompt_len=12), 0.0)
    plan = sched.schedule(0, 0.0)
    sched.update(plan, FakeWorker(0, 16, 4).step(plan), 0.0)
    assert sched.workers[0].blocks.events is None and sched.drain_kv_events() == []


def test_reset_prefix_cache_reports_each_block_removed():
    sched = Scheduler(SchedulerConfig(), block_size=4, max_model_len=256, kv_events=True)
    sched.add_worker(0, 16, 0.0)
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    sched.add(EngineRequest(request_id="a", prompt_token_ids=tuple(range(13)), sampling=sp), 0.0)
    plan = sched.schedule(0, 0.0)
    sched.update(plan, FakeWorker(0, 16, 4).step(plan), 0.0)
    ((_w, raw),) = sched.drain_kv_events()
    stored = [e for e in to_wire_events(raw, 4) if isinstance(e, BlockStored)]
    assert len(stored) == 1 and len(stored[0].block_hashes) == 3
    assert sched.workers[0].blocks.reset_prefix_cache() == 3
    ((_, raw),) = sched.drain_kv_events()
    (removed,) = to_wire_events(raw, 4)
    assert isinstance(removed, BlockRemoved)
    assert sorted(removed.block_hashes) == sorted(stored[0].block_hashes)


# --------------------------------------------------------------------------- publisher


def recv_all(sock: zmq.Socket, timeout_ms: int = 2000) -> list[list[bytes]]:
    out = []
    while sock.poll(timeout_ms):
        out.append(sock.recv_multipart())
        timeout_ms = 200
    return out


def test_publisher_numbers_batches_and_replays_them_to_a_late_subscriber(tmp_path):
    cfg = KVEventsConfig(endpoint=f"ipc://{tmp_path}/kv", replay_endpoint=f"ipc://{tmp_path}/rp",
                         topic="kv@x", buffer_steps=3)
    pub = KVEventPublisher(cfg, 0, block_size=2)
    ctx = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@x")
        sub.connect(cfg.endpoint)
        time.sleep(0.3)  # PUB drops what it sends before the subscription arrives
        for i in range(4):
            pub.publish([(i % 2, [(2,), (0, 100 + i, None, (i, i), "")])], float(i))
        pub.publish([], 9.0)  # nothing drained: nothing sent
        frames = recv_all(sub)
        assert [f[0] for f in frames] == [b"kv@x"] * 4
        assert [int.from_bytes(f[1], "big") for f in frames] == [0, 1, 2, 3]
        batches = [VLLM_DECODER.decode(f[2]) for f in frames]
        assert [b.data_parallel_rank for b in batches] == [0, 1, 0, 1]
        assert [b.ts for b in batches] == [0.0, 1.0, 2.0, 3.0]
        assert [b.events[1].block_hashes for b in batches] == [[100], [101], [102], [103]]

        late = ctx.socket(zmq.DEALER)
        late.connect(cfg.replay_endpoint)
        late.send_multipart([b"", (2).to_bytes(8, "big")])
        replies = recv_all(late)
        assert replies[-1] == [b"", b"", END_SEQ, b""]
        assert [(r[1], int.from_bytes(r[2], "big"), r[3]) for r in replies[:-1]] == [
            (b"kv@x", 2, frames[2][2]), (b"kv@x", 3, frames[3][2])]
        late.send_multipart([b"", (0).to_bytes(8, "big")])  # 0 is gone: buffer_steps=3
        assert [int.from_bytes(r[2], "big") for r in recv_all(late)[:-1]] == [1, 2, 3]
    finally:
        pub.close()
        ctx.destroy(linger=0)


# --------------------------------------------------------------------------- config


def test_kv_events_config_reads_vllms_json():
    cfg = config_from_args(["--kv-events-config", '{"enable_kv_cache_events": true, '
                            '"publisher": "zmq", "endpoint": "tcp://*:6001", '
                            '"replay_endpoint": "tcp://*:6002", "buffer_steps": 5, "hwm": 7, '
                            '"topic": "kv"}'])
    assert cfg.cache.kv_events == KVEventsConfig(endpoint="tcp://*:6001",
                                                 replay_endpoint="tcp://*:6002",
                                                 buffer_steps=5, hwm=7, topic="kv")
    assert config_from_args([]).cache.kv_events is None
    assert parse_kv_events_config('{"enable_kv_cache_events": false}') is None
    assert parse_kv_events_config({"enable_kv_cache_events": True, "publisher": "null"}) is None
    assert parse_kv_events_config('{"enable_kv_cache_events": true}') == KVEventsConfig()


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ("[1]", "must be a JSON object"),
    ('{"enable_kv_cache_events": true, "publisher": "kafka"}', "publisher"),
    ('{"enable_kv_cache_events": true, "port": 1}', "unknown keys ['port']"),
    ('{"enable_kv_cache_events": true, "hwm": "many"}', "hwm"),
    ('{"enable_kv_cache_events": true, "endpoint": "http://x:1"}', "endpoint must be"),
    ('{"enable_kv_cache_events": true, "buffer_steps": 0}', "buffer_steps must be >= 1"),
])
def test_bad_kv_events_config_is_refused_naming_the_flag(text, message):
    with pytest.raises(ConfigError, match="--kv-events-config") as e:
        config_from_args(["--kv-events-config", text])
    assert message in str(e.value)


def test_each_pool_gets_its_own_endpoint():
    assert pool_endpoint("tcp://*:5557", 0) == "tcp://*:5557"
    assert pool_endpoint("tcp://*:5557", 2) == "tcp://*:5559"
    assert pool_endpoint("tcp://10.0.0.1:0", 1) == "tcp://10.0.0.1:0"
    assert pool_endpoint("ipc:///tmp/kv", 1) == "ipc:///tmp/kv-pool1"
    assert pool_endpoint(None, 1) is None
