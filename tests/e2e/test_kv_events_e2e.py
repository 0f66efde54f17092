"""KV events from the engine as users launch it: `--kv-events-config` with vLLM's JSON, a
subscriber that decodes with vLLM's own classes, and a late one that catches up by replay."""

from __future__ import annotations

import json
import threading
import time

import httpx
import msgspec
import pytest
import zmq
from e2e.engine_proc import launched
from vllm.distributed import kv_events as vllm_events

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BLOCK_SIZE = 16
DECODER = msgspec.msgpack.Decoder(type=vllm_events.KVEventBatch)


class Subscriber(threading.Thread):
    """Receives (seq, batch, arrival time) until stopped."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"kv")
        self.sock.connect(endpoint)
        self.got: list[tuple[int, bytes, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.sock.poll(50):
                topic, seq, payload = self.sock.recv_multipart()
                assert topic == b"kv"
                self.got.append((int.from_bytes(seq, "big"), payload, time.time()))


def stored_blocks(payloads: list[bytes]) -> dict[int, dict[int, tuple[int, ...]]]:
    """Per rank, the blocks a router would index after these batches: hash -> tokens."""
    index: dict[int, dict[int, tuple[int, ...]]] = {}
    for payload in payloads:
        batch = DECODER.decode(payload)
        held = index.setdefault(batch.data_parallel_rank, {})
        for ev in batch.events:
            if isinstance(ev, vllm_events.AllBlocksCleared):
                held.clear()
            elif isinstance(ev, vllm_events.BlockRemoved):
                for h in ev.block_hashes:
                    del held[h]  # KeyError: removed without being stored
            else:
                assert ev.block_size == BLOCK_SIZE and ev.medium == "GPU"
                assert ev.parent_block_hash is None or ev.parent_block_hash in held
                for i, h in enumerate(ev.block_hashes):
                    held[h] = tuple(ev.token_ids[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
    return index


def test_engine_publishes_vllm_kv_events_with_replay(tmp_path):
    config = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                         "endpoint": f"ipc://{tmp_path}/kv",
                         "replay_endpoint": f"ipc://{tmp_path}/replay", "topic": "kv"})
    prompts = [[1000 + 50 * i + j for j in range(50)] for i in range(8)]  # 3 full blocks each
    ctx = zmq.Context()
    with launched("--workers", "2", "--num-kv-blocks", "8", "--block-size", str(BLOCK_SIZE),
                  "--kv-events-config", config) as (proc, _):
        sub = Subscriber(ctx, f"ipc://{tmp_path}/kv")
        sub.start()
        time.sleep(0.5)  # the subscription reaches the PUB socket
        base = f"http://127.0.0.1:{proc.http_port}/v1/completions"

        def complete(prompt: list[int]) -> dict:
            r = httpx.post(base, timeout=60, json={"model": "default", "prompt": prompt,
                                                   "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()

        complete(prompts[0])
        hit = complete(prompts[0])
        answered_at = time.time()
        assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] == 48
        for p in prompts[1:]:  # 8 blocks per worker: later prompts evict earlier ones
            complete(p)
        time.sleep(0.5)
        sub.stop.set()
        sub.join()

        # The live stream: consecutive sequence numbers, the first prompt's chain announced
        # (tokens and all) before the request that hit it was answered.
        seqs = [s for s, _, _ in sub.got]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        first = [(payload, at) for _, payload, at in sub.got
                 if any(isinstance(e, vllm_events.BlockStored) and e.parent_block_hash is None
                        and list(e.token_ids[:16]) == prompts[0][:16]
                        for e in DECODER.decode(payload).events)]
        assert first and first[0][1] < answered_at
        chain = next(e for e in DECODER.decode(first[0][0]).events
                 if isinstance(e, vllm_events.BlockStored))
        assert list(chain.token_ids) == prompts[0][:48] and len(chain.block_hashes) == 3

        # A late subscriber: replay from 0 gives every batch since start-up (each worker's
        # AllBlocksCleared first), the live ones byte for byte, then the end marker.
        late = ctx.socket(zmq.DEALER)
        late.connect(f"ipc://{tmp_path}/replay")
        late.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed = []
        while late.poll(5000):
            frames = late.recv_multipart()
            if frames[2] == (-1).to_bytes(8, "big", signed=True):
                break
            replayed.append((int.from_bytes(frames[2], "big"), frames[3]))
        assert [s for s, _ in replayed] == list(range(len(replayed)))
        assert replayed[seqs[0]:] == [(s, p) for s, p, _ in sub.got]
        starts = [DECODER.decode(p) for _, p in replayed[:2]]
        assert sorted(b.data_parallel_rank for b in starts) == [0, 1]
        assert all(isinstance(b.events[0], vllm_events.AllBlocksCleared) for b in starts)

        index = stored_blocks([p for _, p in replayed])
        removed = sum(len(e.block_hashes) for _, p in replayed for e in DECODER.decode(p).events
                      if isinstance(e, vllm_events.BlockRemoved))
        assert removed > 0 and all(len(held) <= 8 for held in index.values())
        # Every full block the engine still caches came from one of our prompts.
        blocks = {tuple(p[i * 16:(i + 1) * 16]) for p in prompts for i in range(3)}
        assert set().union(*index.values()) and all(
            tokens in blocks for held in index.values() for tokens in held.values())
    ctx.destroy(linger=0)
