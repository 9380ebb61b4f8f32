"""KV memory that follows a sliding window: blocks no query can attend to again are freed.

When every attention layer of a model is a sliding window (Mistral; or any model run with
``attention="sliding"`` / ``"sinks"``), a query at position p reads only positions
``[p - span + 1, p]`` and the first ``sinks`` ones. ``WindowedBlockManager`` is a
``BlockManager`` whose ``trim(request, start)`` (the scheduler calls it as it plans a step that
starts at ``start``) releases the blocks wholly below ``start - span + 1`` that hold no sink,
leaving a hole (``HOLE``) in the request's table: a long generation holds at most
``ceil(span / block_size) + 1 + sink blocks`` plus the step's new tokens' blocks.

Holes are never read: the kernels visit only the window's tiles and the sinks'
(``flashserve.kernels._paged_common.window_tiles``; the Worker keeps whatever id it had there).
A freed block that was registered in the prefix cache stays cached (evictable), so a later
request with the same prefix can still reuse it; a lookup stops at the first evicted block.
Swap moves only the blocks held; the holes come back as holes. Freed blocks may still be read
by the step in flight: any later owner writes them in a later step, in stream order.

Models that mix windowed and full layers (Gemma 3) keep one table per group of layers
(``flashserve.cache.kv_groups``), each windowed group one of these.

``EvictingBlockManager`` does the same for H2O layers (heavy hitters at a KV budget). After each
step an H2O layer *compacts* the tokens each KV head keeps into the last slots of the sequence's
logical table: once a sequence has ``S`` tokens, every KV head of every H2O layer keeps exactly
``h2o_kept(budget, sinks, S)`` of them (a count the host computes; which ones differs per head),
stored in position order at logical positions ``[S - kept, S)``. A step starting at ``start``
therefore reads ``[start - h2o_kept(start), start + new)`` only, and the blocks wholly below are
released as a window's are. The sinks are the first entries of that region (never evicted, and
compaction keeps the order). Compacted blocks hold a head-dependent mix of positions, so they are
never registered in the prefix cache (an H2O table neither shares nor is shared) nor forked (beam
search is refused). The tokens' accumulated scores live beside the cache, indexed by slot, and do
not travel with a swap: a preempted H2O request is recomputed (``can_swap_out`` is False).
"""

from __future__ import annotations

import math
from itertools import repeat

import numpy as np

from flashserve.cache.block_manager import BlockManager
from flashserve.request import Request

HOLE = -1  # a table entry whose block was released (its positions are out of every window)


def h2o_kept(kv_budget: float, num_sinks: int, seq_len: int) -> int:
    """Tokens every KV head of an H2O layer keeps once a sequence has ``seq_len`` tokens.

    After each step a head keeps ``budget = max(ceil(kv_budget * S), sinks + 1)`` tokens, or more
    when the protected ones (the sinks and the newest ``budget // 2``) outnumber it; the count
    does not depend on how the tokens were cut into steps (each step adds at most as many tokens
    as the count can grow), so the host and the layers agree on it."""
    budget = max(math.ceil(kv_budget * seq_len), num_sinks + 1)
    protected = min(seq_len, num_sinks + budget // 2)
    return min(seq_len, max(budget, protected))


class WindowedBlockManager(BlockManager):
    """A BlockManager that releases blocks out of every layer's window (see module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 num_host_blocks: int = 0, *, sinks: int, span: int) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching, num_host_blocks)
        self.sinks = sinks
        self.span = span
        self._sink_blocks = -(-sinks // block_size)
        self._trimmed: dict[str, int] = {}  # first table index not yet released, per request

    def blocks_held(self, request_id: str) -> int:
        return sum(1 for b in self.tables.get(request_id, ()) if b != HOLE)

    def oldest_read(self, start: int) -> int:
        """The oldest non-sink position a step starting at ``start`` (or any later one) reads."""
        return start - self.span + 1

    def trim(self, request_id: str, start: int) -> None:
        """Release the blocks a step whose first query sits at ``start`` (and every later step)
        can no longer read."""
        table = self.tables.get(request_id)
        if not table:
            return
        end = min(self.oldest_read(start) // self.block_size, len(table))  # blocks wholly below the window
        first = max(self._trimmed.get(request_id, 0), self._sink_blocks)
        if end <= first:
            return
        released = [b for b in table[first:end] if b != HOLE]
        table[first:end] = [HOLE] * (end - first)
        self._trimmed[request_id] = end
        self.pool.free(released[::-1])  # newest first: the oldest are evicted last from the LRU

    def _trims(self, request_ids: list[str], starts: np.ndarray, have: np.ndarray) -> np.ndarray:
        """``quiet_decodes`` sends a request through the per-request calls when its ``trim`` at
        ``starts`` releases a block (its window left one behind: once per block of tokens). A
        multi-step plan trims at its first position, so its later steps find every block their
        windows read (a window's oldest position only moves forward)."""
        n = len(request_ids)
        below = np.minimum(np.fromiter(map(self.oldest_read, starts.tolist()), np.int64, n) // self.block_size, have)
        first = np.maximum(np.fromiter(map(self._trimmed.get, request_ids, repeat(0)), np.int64, n), self._sink_blocks)
        return below > first

    def commit(self, request: Request) -> None:
        """As ``BlockManager.commit``, skipping holes (a request swapped back in commits anew)."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        table = self.tables.get(rid)
        done = self._committed.get(rid, 0)
        if not table or request.num_computed_tokens // self.block_size <= done:
            return
        token_ids = request.known_tokens
        num_full = min(min(request.num_computed_tokens, len(token_ids)) // self.block_size, len(table))
        if num_full <= done:
            return
        hashes = self._chain(rid, token_ids, num_full)
        for i in range(done, num_full):
            if table[i] != HOLE and table[i] not in self.pool.block_hash:
                self.pool.register(table[i], hashes[i])
        self._committed[rid] = num_full

    def free(self, request_id: str) -> None:
        table = self.tables.get(request_id)
        if table is not None:
            self.tables[request_id] = [b for b in table if b != HOLE]
        self._trimmed.pop(request_id, None)
        host = self.host_tables.get(request_id)
        if host is not None:
            self.host_tables[request_id] = [b for b in host if b != HOLE]
        super().free(request_id)

    def can_swap_out(self, request_id: str) -> bool:
        return self.blocks_held(request_id) <= self.host.num_free

    def swap_out(self, request_id: str) -> list[tuple[int, int]]:
        table = self.tables.pop(request_id)
        self._committed.pop(request_id, None)
        held = [b for b in table if b != HOLE]
        host = iter(self.host.allocate(len(held)))
        self.host_tables[request_id] = [next(host) if b != HOLE else HOLE for b in table]
        self.pool.free(held[::-1])
        return [(d, h) for d, h in zip(table, self.host_tables[request_id]) if d != HOLE]

    def swap_in(self, request_id: str) -> list[tuple[int, int]] | None:
        host = self.host_tables[request_id]
        held = [h for h in host if h != HOLE]
        if len(held) > self.pool.num_free:
            return None
        device = iter(self.pool.allocate(len(held)))
        self.tables[request_id] = [next(device) if h != HOLE else HOLE for h in host]
        del self.host_tables[request_id]
        self.host.free(held)
        return [(h, d) for h, d in zip(host, self.tables[request_id]) if h != HOLE]

    def check_invariants(self) -> None:
        saved = self.tables, self.host_tables
        self.tables = {r: [b for b in t if b != HOLE] for r, t in saved[0].items()}
        self.host_tables = {r: [b for b in t if b != HOLE] for r, t in saved[1].items()}
        try:
            super().check_invariants()
        finally:
            self.tables, self.host_tables = saved


class EvictingBlockManager(WindowedBlockManager):
    """A BlockManager for H2O layers: releases the blocks below the kept tokens' region (see the
    module docstring); never shares blocks through the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 num_host_blocks: int = 0, *, kv_budget: float, sinks: int) -> None:
        # the sinks are compacted with the other kept tokens: no block is held for them
        super().__init__(num_blocks, block_size, False, num_host_blocks, sinks=0, span=1)
        self.kv_budget = kv_budget
        self.h2o_sinks = sinks

    def oldest_read(self, start: int) -> int:
        return start - h2o_kept(self.kv_budget, self.h2o_sinks, start)

    def quiet_decodes(self, request_ids, starts, known, sent, lens=None) -> None:
        """Not in bulk: the per-request loop claims H2O decodes (and plans stay one model step)."""
        return None

    def can_swap_out(self, request_id: str) -> bool:
        return False  # the accumulated scores stay on the device: recompute instead

    def fork(self, parent_id: str, child_id: str, num_tokens: int, share_partial: bool) -> list[tuple[int, int]] | None:
        raise ValueError("h2o attention compacts each sequence's kept tokens in place, so its KV blocks "
                         "cannot be shared with a forked sequence (beam search); use another attention kind")
