"""The KV block pool of one worker.

The scheduler allocates every block of every worker here, so it knows each worker's cache
exactly. Blocks hold ``block_size`` tokens; block ids index the worker's KV tensors.
Reference counts let several requests share a block (prefix caching grows on this).
"""

from __future__ import annotations

from collections import deque


class NoFreeBlocksError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        """New blocks needed to hold ``num_tokens`` tokens when ``num_held`` are held."""
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise NoFreeBlocksError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(num_blocks)]
        for b in out:
            self._ref_counts[b] = 1
        return out

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks that reach zero return to the pool.

        Freed in reverse so the tail of a sequence is reused first.
        """
        for b in reversed(block_ids):
            rc = self._ref_counts[b] - 1
            if rc < 0:
                raise AssertionError(f"block {b} freed more often than allocated")
            self._ref_counts[b] = rc
            if rc == 0:
                self._free.append(b)

    def check_integrity(self, held: list[list[int]]) -> None:
        """Verify every invariant against the block lists requests hold; raise AssertionError."""
        counts = [0] * self.num_blocks
        for blocks in held:
            for b in blocks:
                assert 0 <= b < self.num_blocks, f"block id {b} out of range"
                counts[b] += 1
        assert counts == self._ref_counts, "reference counts disagree with the requests' blocks"
        free = set(self._free)
        assert len(free) == len(self._free), "a block is in the free list twice"
        for b in range(self.num_blocks):
            assert (b in free) == (counts[b] == 0), f"block {b}: free={b in free} refs={counts[b]}"
