"""The KV block pool of one worker, with an exact prefix cache.

The scheduler allocates every block of every worker here, so it knows each worker's cache
exactly: a prefix lookup answers what the worker holds now, with no lag.

Blocks hold ``block_size`` tokens; ids index the worker's KV tensors. Reference counts let
requests share blocks. A *full* block whose KV has been computed is registered in the prefix
cache under a chained hash (``hash(parent hash, its tokens, extra keys)``); when its last
reference goes, it stays cached but becomes evictable. Free blocks form one LRU queue:
allocation takes the front, evicting the cached content there; freeing appends a request's
blocks tail-first, so a chain's tail is evicted before its head; blocks that hold nothing
reusable go to the very front.

Exactness: a hash is only a lookup key. A hit is accepted when the cached block's own tokens,
its parent block and that parent's *generation* (bumped each time the block is reallocated)
match the chain being looked up, so a hash collision can only cause a miss, never wrong KV.

KV events (``--kv-events-config``, docs/kv_events.md): with ``record_events``, every block
that enters the prefix cache appends ``(KV_STORED, hash, parent hash, tokens, extra)`` to
``events`` and every cached block that leaves it (evicted by an allocation, or reset)
appends ``(KV_REMOVED, hash)``, in the order they happen. The pool drains the list after
each scheduler call and a publisher thread turns it into vLLM's wire format. Disabled,
``events`` is None and the cost is one test on the paths that register or evict.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

#: A registered block's identity: (parent block id or -1, parent generation, tokens, extra).
BlockKey = tuple[int, int, tuple[int, ...], str]

ROOT_HASH = 0x5EED

#: Tags of the raw KV events in ``BlockManager.events`` (engine.kv_events converts them).
KV_STORED, KV_REMOVED, KV_CLEARED = 0, 1, 2
#: ``(KV_STORED, hash, parent hash or None, tokens, extra)``, ``(KV_REMOVED, hash)`` or
#: ``(KV_CLEARED,)``: plain tuples, cheap to append on the scheduler's hot path.
KVEvent = tuple[Any, ...]


def chain_hash(parent_hash: int, tokens: tuple[int, ...], extra: str = "") -> int:
    """The prefix-cache key of a full block that follows ``parent_hash``."""
    return hash((parent_hash, tokens, extra))


class NoFreeBlocksError(RuntimeError):
    pass


class TokenSource(Protocol):
    """Anything that can hand out a slice of its token ids as a tuple (a ``Request``)."""

    def token_slice(self, start: int, end: int) -> tuple[int, ...]: ...


class TokenTuple:
    """A plain sequence of token ids as a ``TokenSource``."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = tuple(token_ids)

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        return self.token_ids[start:end]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, record_events: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._generation = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks  # set while registered
        self._key: list[BlockKey | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # hash -> block id
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_hit_queries = 0
        self.num_hit_tokens = 0
        self.num_query_tokens = 0
        #: Bumped by every change that can alter what ``match_prefix`` answers (blocks
        #: reallocated, registered or forgotten), so callers can keep an answer until then.
        self.version = 0
        #: KV events since the last drain (None: not recorded); see the module docstring.
        self.events: list[KVEvent] | None = [] if record_events else None

    # ------------------------------------------------------------------ capacity

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request references (some still hold cached, reusable content)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        """New blocks needed to hold ``num_tokens`` tokens when ``num_held`` are held."""
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    # ------------------------------------------------------------------ allocation

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` from the front of the free queue, evicting cached content."""
        if num_blocks > len(self._free):
            raise NoFreeBlocksError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        out = []
        for _ in range(num_blocks):
            b, _ = self._free.popitem(last=False)
            h = self._hash[b]
            if h is not None:
                del self._cached[h]
                self._hash[b] = None
                self._key[b] = None
                if self.events is not None:
                    self.events.append((KV_REMOVED, h))
            self._generation[b] += 1
            self.version += 1
            self._ref_counts[b] = 1
            out.append(b)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block. Blocks left unreferenced become free: cached
        ones at the back of the LRU queue, tail of the chain first; others at the front."""
        for b in reversed(block_ids):
            rc = self._ref_counts[b] - 1
            if rc < 0:
                raise AssertionError(f"block {b} freed more often than allocated")
            self._ref_counts[b] = rc
            if rc == 0:
                self._free[b] = None
                if self._hash[b] is None:
                    self._free.move_to_end(b, last=False)

    # ------------------------------------------------------------------ prefix cache

    def match_prefix(self, hashes: Sequence[int], tokens: TokenSource, extra: str = "",
                     max_blocks: int | None = None) -> list[int]:
        """Cached blocks holding the longest prefix of ``tokens`` (full blocks only).

        ``hashes[i]`` is the chain hash of block ``i`` of ``tokens``. Read-only: use
        ``acquire`` to take references to the blocks returned.
        """
        bs = self.block_size
        limit = len(hashes) if max_blocks is None else min(max_blocks, len(hashes))
        out: list[int] = []
        # Placement probes every worker per request, mostly missing at the first block: the
        # loop binds the tables once and tracks the parent's generation as it goes.
        cached, keys, generation = self._cached, self._key, self._generation
        parent, parent_gen = -1, 0
        for i in range(limit):
            b = cached.get(hashes[i])
            if b is None:
                break
            key = keys[b]
            assert key is not None  # a cached block has a key
            if (key[0] != parent or key[1] != parent_gen or key[3] != extra
                    or key[2] != tokens.token_slice(i * bs, (i + 1) * bs)):
                break  # a hash collision: not our prefix
            out.append(b)
            parent, parent_gen = b, generation[b]
        return out

    def num_unreferenced(self, block_ids: Sequence[int]) -> int:
        """How many of ``block_ids`` sit in the free queue (a hit on them takes them out)."""
        return sum(1 for b in block_ids if self._ref_counts[b] == 0)

    def num_sole_owner(self, block_ids: Sequence[int]) -> int:
        """How many of ``block_ids`` would become free if their holder let go."""
        return sum(1 for b in block_ids if self._ref_counts[b] == 1)

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Take a reference to each of ``block_ids`` (a prefix hit)."""
        for b in block_ids:
            if self._ref_counts[b] == 0:
                del self._free[b]
            self._ref_counts[b] += 1

    def register(self, block_id: int, block_hash: int, parent_id: int,
                 tokens: tuple[int, ...], extra: str = "",
                 parent_hash: int | None = None) -> int | None:
        """Cache a full, computed block that follows ``parent_id`` (-1 for the first block).

        Returns the block that now caches this content, to pass as the parent of the next
        block: ``block_id``, or an existing block with identical content and parent (then
        ``block_id`` stays private and is reused first once freed). Returns None if the hash
        is taken by different content (a collision): the chain is not cached further.
        ``parent_hash``, the chain hash of the block before (None for the first), is only
        recorded in KV events (default: the hash ``parent_id`` is cached under).
        """
        parent_gen = self._generation[parent_id] if parent_id >= 0 else 0
        key = (parent_id, parent_gen, tokens, extra)
        existing = self._cached.get(block_hash)
        if existing is not None:
            return existing if self._key[existing] == key else None
        if self._hash[block_id] is not None:  # already caches other content
            return block_id if self._key[block_id] == key else None
        self._cached[block_hash] = block_id
        self.version += 1
        self._hash[block_id] = block_hash
        self._key[block_id] = key
        if self.events is not None:
            if parent_hash is None and parent_id >= 0:
                parent_hash = self._hash[parent_id]
            self.events.append((KV_STORED, block_hash, parent_hash, tokens, extra))
        return block_id

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_hit_queries += 1
        self.num_query_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    def reset_prefix_cache(self) -> int:
        """Forget every cached block that no request holds; returns how many."""
        dropped = [b for b in self._free if self._hash[b] is not None]
        for b in dropped:
            h = self._hash[b]
            assert h is not None
            del self._cached[h]
            self._hash[b] = None
            self._key[b] = None
            self._free.move_to_end(b, last=False)
            if self.events is not None:
                self.events.append((KV_REMOVED, h))
        self.version += 1
        return len(dropped)

    # ------------------------------------------------------------------ checks

    def check_integrity(self, held: list[list[int]]) -> None:
        """Verify every invariant against the block lists requests hold; raise AssertionError."""
        counts = [0] * self.num_blocks
        for blocks in held:
            for b in blocks:
                assert 0 <= b < self.num_blocks, f"block id {b} out of range"
                counts[b] += 1
        assert counts == self._ref_counts, "reference counts disagree with the requests' blocks"
        for b in range(self.num_blocks):
            assert (b in self._free) == (counts[b] == 0), f"block {b}: free={b in self._free} refs={counts[b]}"
        for h, b in self._cached.items():
            key = self._key[b]
            assert self._hash[b] == h and key is not None, f"cache entry {h} -> {b} is stale"
            assert len(key[2]) == self.block_size, f"cached block {b} is not full"
        assert sum(h is not None for h in self._hash) == len(self._cached), "orphan block hash"
