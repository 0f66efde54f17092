"""KV cache events in vLLM 0.32's wire format, published by a pool for all of its workers.

Routers that keep an index of which replica caches which prefix (llm-d's KV-cache manager,
NVIDIA Dynamo's KV router, ...) subscribe to vLLM's ``vllm.distributed.kv_events`` stream.
This module speaks it byte for byte (docs/kv_events.md):

- a ZeroMQ PUB socket sends multipart messages ``(topic, seq, payload)``: ``seq`` is an
  8-byte big-endian counter (0, 1, 2, ... per pool process), ``payload`` a MessagePack
  ``KVEventBatch`` ``[ts, [event, ...], data_parallel_rank]`` whose events are maps tagged
  ``{"type": "BlockStored" | "BlockRemoved" | "AllBlocksCleared", ...}``;
- an optional ROUTER replay socket: a client sends ``(b"", start_seq)`` (8 bytes, big endian)
  and gets back every buffered message from ``start_seq`` on as ``(b"", topic, seq, payload)``,
  then ``(b"", b"", -1 as 8 signed bytes, b"")``.

The pool owns every worker's block table, so it publishes for all of them:
``data_parallel_rank`` is the worker id. Block hashes are the scheduler's own chain hashes as
unsigned 64-bit integers (what vLLM sends with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``); each
``BlockStored`` names its parent's hash, so a subscriber can rebuild every chain.

Cost: the scheduler only appends plain tuples (``engine.scheduler.block_manager``); the pool
hands each drained list to ``KVEventPublisher.publish`` (a queue put) and a daemon thread
builds the structs, encodes, numbers, sends and buffers them, and answers replay requests.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from typing import Any

import msgspec
import zmq

from engine.config import KVEventsConfig
from engine.scheduler.block_manager import KV_REMOVED, KV_STORED, KVEvent

log = logging.getLogger(__name__)

#: The primary KV cache tier, as vLLM names it (its CPU build says the same).
MEDIUM_GPU = "GPU"
#: The replay socket's end-of-stream marker: sequence number -1.
END_SEQ = (-1).to_bytes(8, "big", signed=True)
_U64 = (1 << 64) - 1


# --------------------------------------------------------------------------- schema
# Field order, defaults and struct options are vLLM 0.32's: the events are tagged maps
# (defaults omitted), the batch a positional array.


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the tagged events (the tag is the class name)."""


class BlockStored(KVCacheEvent):
    """Blocks that entered the prefix cache, a chain in order: ``block_hashes[0]`` follows
    ``parent_block_hash`` (None: the first block of a prompt); ``token_ids`` holds
    ``block_size`` tokens per block."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    #: One entry per block: the keys besides the tokens its hash covers (the cache salt).
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    """Blocks evicted from the prefix cache."""

    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    """The worker's whole cache is gone (it joined with an empty one, or it died)."""


KVEventUnion = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One published message: the events of one worker (``data_parallel_rank``)."""

    ts: float
    events: list[KVEventUnion]
    data_parallel_rank: int | None = None


# --------------------------------------------------------------------------- conversion


def to_wire_events(raw: list[KVEvent], block_size: int) -> list[KVEventUnion]:
    """The block manager's raw events as vLLM's, in order. Consecutive stores that continue
    one chain (each block's parent is the previous block) become one ``BlockStored``, and
    consecutive removals one ``BlockRemoved``, as vLLM groups them. (This runs on the
    publisher's thread, but holds the interpreter while it does: keep it tight.)"""
    out: list[KVEventUnion] = []
    stored: BlockStored | None = None  # the last event, when it is a BlockStored
    removed: BlockRemoved | None = None  # the last event, when it is a BlockRemoved
    last_hash = -1  # of the last block of ``stored``
    salt = ""  # of ``stored``
    for ev in raw:
        tag = ev[0]
        if tag == KV_STORED:
            h = ev[1] & _U64
            parent = ev[2]
            extra = ev[4]
            if parent is not None:
                parent &= _U64
            if stored is not None and parent == last_hash and extra == salt:
                stored.block_hashes.append(h)
                stored.token_ids.extend(ev[3])
                if stored.extra_keys is not None:
                    stored.extra_keys.append((extra,))
            else:
                stored = BlockStored(block_hashes=[h], parent_block_hash=parent,
                                     token_ids=list(ev[3]), block_size=block_size,
                                     lora_id=None, medium=MEDIUM_GPU, lora_name=None,
                                     extra_keys=[(extra,)] if extra else None)
                salt = extra
                out.append(stored)
            last_hash = h
            removed = None
        elif tag == KV_REMOVED:
            if removed is None:
                removed = BlockRemoved(block_hashes=[ev[1] & _U64], medium=MEDIUM_GPU)
                out.append(removed)
            else:
                removed.block_hashes.append(ev[1] & _U64)
            stored = None
        else:
            out.append(AllBlocksCleared())
            stored = removed = None
    return out


def pool_endpoint(endpoint: str | None, pool_index: int) -> str | None:
    """Pool ``pool_index``'s address: a tcp port + the index (port 0: any free port), an
    ipc/inproc path with ``-pool<index>`` appended; pool 0 gets ``endpoint`` unchanged."""
    if endpoint is None or pool_index == 0:
        return endpoint
    if endpoint.startswith("tcp://"):
        base, _, port = endpoint.rpartition(":")
        return endpoint if int(port) == 0 else f"{base}:{int(port) + pool_index}"
    return f"{endpoint}-pool{pool_index}"


def _binds(endpoint: str) -> bool:
    """vLLM's rule: wildcard hosts and ipc/inproc paths bind; other addresses connect."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


# --------------------------------------------------------------------------- publisher

Drained = list[tuple[int, list[KVEvent]]]


class KVEventPublisher:
    """PUB + ROUTER replay sockets served by one daemon thread, fed through a queue.

    ``publish`` never touches a socket: it puts the drained events on a bounded queue (it
    blocks only if the thread falls ``max_queue_size`` drains behind: back-pressure rather
    than a silently wrong index). Sockets are bound here, so a bad address fails the pool's
    start, and used only by the thread afterwards."""

    def __init__(self, cfg: KVEventsConfig, pool_index: int, block_size: int) -> None:
        self.block_size = block_size
        self.endpoint = pool_endpoint(cfg.endpoint, pool_index)
        self.replay_endpoint = pool_endpoint(cfg.replay_endpoint, pool_index)
        self._topic = cfg.topic.encode()
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(cfg.hwm)
        self._replay: zmq.Socket[Any] | None = None
        try:
            assert self.endpoint is not None
            if _binds(self.endpoint):
                self._pub.bind(self.endpoint)
            else:
                self._pub.connect(self.endpoint)
            if self.replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.bind(self.replay_endpoint)
        except zmq.ZMQError as e:
            self._ctx.destroy(linger=0)
            raise RuntimeError(f"--kv-events-config: cannot open {self.endpoint} / "
                               f"{self.replay_endpoint}: {e}") from e
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=cfg.buffer_steps)
        self._queue: queue.Queue[tuple[float, Drained] | None] = queue.Queue(cfg.max_queue_size)
        self.next_seq = 0
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()
        log.info("KV events on %s (replay %s)", self.endpoint, self.replay_endpoint)

    def publish(self, drained: Drained, now: float) -> None:
        """Queue the events drained from the scheduler at time ``now`` (seconds)."""
        if drained:
            self._queue.put((now, drained))

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (within ``timeout``), stop the thread, close the sockets."""
        self._queue.put(None)
        self._thread.join(timeout)
        self._ctx.destroy(linger=int(timeout * 1000) if not self._thread.is_alive() else 0)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        encoder = msgspec.msgpack.Encoder()
        while True:
            if self._replay is not None and self._replay.poll(0):
                self._serve_replay()
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                return
            now, drained = item
            try:
                for worker_id, raw in drained:
                    batch = KVEventBatch(ts=now, events=to_wire_events(raw, self.block_size),
                                         data_parallel_rank=worker_id)
                    self._send(encoder.encode(batch))
            except Exception:  # never let a bad event kill the stream silently
                log.exception("KV events: publishing failed")

    def _send(self, payload: bytes) -> None:
        seq = self.next_seq
        self.next_seq += 1
        self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
        self._buffer.append((seq, payload))

    def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            try:
                frames = self._replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("KV events: bad replay request of %d frames", len(frames))
                continue
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in self._buffer:
                if seq >= first:
                    self._replay.send_multipart((client, b"", self._topic,
                                                 seq.to_bytes(8, "big"), payload))
            self._replay.send_multipart((client, b"", b"", END_SEQ, b""))
