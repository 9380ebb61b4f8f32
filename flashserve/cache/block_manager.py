"""Paged KV cache bookkeeping: which physical blocks each request owns. Pure Python, no torch.

The pool has ``num_blocks`` blocks of ``block_size`` token slots. Blocks are reference counted
so that several requests can share one (prefix sharing); a block returns to the free list when
its count drops to zero. Block size 1 gives token-granular KV (TokenAttention-like) with the
same code.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Free list and reference counts of the physical KV blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the front of the free list (lowest ids first on a fresh pool)."""
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, only {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def incref(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"incref of free block {block}")
        self.ref_counts[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference from each block; blocks reaching zero go back to the free list."""
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} freed twice")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free.append(b)


class BlockManager:
    """Allocates slots for requests, block by block, as their token count grows."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.tables: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    def can_allocate(self, request_id: str, total_tokens: int) -> bool:
        have = len(self.tables.get(request_id, ()))
        return self.blocks_needed(total_tokens) - have <= self.pool.num_free

    def allocate_slots(self, request_id: str, total_tokens: int) -> list[int] | None:
        """Grow the request's table to hold ``total_tokens``; None (and no change) if the pool is short."""
        table = self.tables.setdefault(request_id, [])
        extra = self.blocks_needed(total_tokens) - len(table)
        if extra > self.pool.num_free:
            if not table:
                del self.tables[request_id]
            return None
        if extra > 0:
            table.extend(self.pool.allocate(extra))
        return table

    def free(self, request_id: str) -> None:
        """Release every block the request holds (a no-op for unknown ids)."""
        table = self.tables.pop(request_id, None)
        if table:
            # Free in reverse so that the tail blocks, the least likely to be shared, are reused first.
            self.pool.free(list(reversed(table)))
