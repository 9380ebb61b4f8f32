"""Paged KV cache bookkeeping: which physical blocks each request owns. Pure Python, no torch.

The pool has ``num_blocks`` blocks of ``block_size`` token slots. Blocks are reference counted
so that several requests can share one; a block with no references is either *free* (no
content worth keeping) or *cached-evictable* (it holds a full block of a known prefix and is
reused if a later request starts with the same tokens). Block size 1 gives token-granular KV
with the same code.

Prefix caching: hash chain, not radix tree
------------------------------------------
A full block is identified by ``hash(parent block's hash, its own token ids)`` (SHA-256 over
the parent digest and the packed token ids, so equal hashes mean equal whole prefixes for all
practical purposes, and a crafted prompt cannot collide with another user's prefix the way it
could with Python's ``hash``). We chose the chain over a radix tree because

* the pool allocates whole blocks anyway, so token-granular matching (the radix tree's gain)
  would still have to round down to a block boundary;
* a lookup is one dict probe per block and needs no tree maintenance when blocks are evicted:
  eviction is per block, least recently used first, independent of any tree shape;
* requests free their blocks tail first, so within one chain the deepest blocks become least
  recently used first and are evicted before the shared roots. An evicted middle block merely
  ends later lookups early; the orphaned tail is evicted by LRU in due course.

Only *full* blocks are ever cached or shared, and a request writes only at positions at or
after its ``num_computed_tokens``, which is at least the cached length: so a shared block is
never written by a request that shares it. Beam search forks a hypothesis (``fork``): the child
shares the parent's full blocks and gets a copy of its partially filled last block (one child
may take the block over, as the parent is retired before anyone writes), so again no request
writes a shared block (``assert_writable`` checks each request when its slots are allocated). A block is registered
as soon as a planned step will fill it with known tokens, before that step runs: a request
admitted later in the same step (``n > 1`` children, identical prompts) shares it, which is
safe because every layer stores the step's K/V before any of its attention reads. ``n > 1``
children are separate requests; each computes its own partial last block.

Invariants (``check_invariants``): free + cached-evictable + in use = total; no block is both
free and referenced; reference counts never negative; every hashed block is in the hash map.

Host blocks (swap space) are plain slots counted by ``HostBlockAllocator``; the copy itself is
done by the runner (``flashserve.runner.swap``). With a host tier (``attach_host_tier``,
``flashserve.cache.host_tier``) an evicted cached block is saved to host memory, and a lookup
continues into the tier: its hits come back into fresh device blocks (``PrefixHit.host``).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import compress, repeat

import numpy as np

from flashserve.request import Request


def consume(calls) -> None:
    """Run a lazy map of calls for their effect (C-level: no Python frame per call)."""
    deque(calls, maxlen=0)


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Chain hash of one full block: its tokens and (through ``parent``) every token before it."""
    h = hashlib.sha256(parent or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockPool:
    """Free list, LRU list of cached-evictable blocks, reference counts and the hash map."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 with a hash; oldest first
        self.block_hash: dict[int, bytes] = {}
        self.cached: dict[bytes, int] = {}
        self.num_evictions = 0
        self.on_evict: Callable[[int, bytes], None] | None = None  # told of each evicted (block, hash)

    @property
    def num_free(self) -> int:
        """Blocks that an allocation can take (free, or cached and evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks: free ones first (lowest ids first on a fresh pool), then evict
        cached ones, least recently used first."""
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV blocks, only {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                h = self.block_hash.pop(b)
                del self.cached[h]
                self.num_evictions += 1
                if self.on_evict is not None:
                    self.on_evict(b, h)
            self.ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def incref(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"incref of free block {block}")
        self.ref_counts[block] += 1

    def touch(self, block: int) -> None:
        """Take a reference to a cached block (a prefix hit), reviving it if it was evictable."""
        if self.ref_counts[block] == 0:
            if block not in self._evictable:
                raise RuntimeError(f"touch of block {block}, which is neither in use nor cached")
            del self._evictable[block]
        self.ref_counts[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference from each block; at zero a hashed block becomes evictable (most
        recently used end of the LRU), an unhashed one goes back to the free list."""
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} freed twice")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if b in self.block_hash:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def register(self, block: int, block_hash: bytes) -> bool:
        """Record that ``block`` holds the full block ``block_hash``; False if another block
        already holds it (then this one stays unhashed and is simply freed later)."""
        if block_hash in self.cached or block in self.block_hash:
            return False
        self.cached[block_hash] = block
        self.block_hash[block] = block_hash
        return True

    def evictable_order(self) -> list[int]:
        """Cached blocks with no references, next to be evicted first."""
        return list(self._evictable)

    def check_invariants(self) -> None:
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not free & evictable, "a block is both free and cached-evictable"
        in_use = {b for b, r in enumerate(self.ref_counts) if r > 0}
        assert all(r >= 0 for r in self.ref_counts), "negative reference count"
        assert not in_use & (free | evictable), "a referenced block is on a free list"
        assert len(free) + len(evictable) + len(in_use) == self.num_blocks, "blocks lost or duplicated"
        assert all(self.cached[h] == b for b, h in self.block_hash.items()), "hash maps disagree"
        assert len(self.cached) == len(self.block_hash)
        assert not free & set(self.block_hash), "a free-listed block still has a hash"


class HostBlockAllocator:
    """Host (swap space) block slots: a free list whose frees take effect at the next step.

    Deferring frees means a host block read by this step's swap-in is never handed to a
    swap-out of the same step (the runner executes all swap-outs before the swap-ins)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._pending: list[int] = []

    def begin_step(self) -> None:
        self._free.extend(self._pending)
        self._pending.clear()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} host blocks, only {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._pending.extend(blocks)


@dataclass
class PrefixHit:
    """Result of a prefix-cache lookup: the cached blocks and how many tokens they cover.
    ``host``: (index in ``blocks``, hash) of the blocks found in the host tier, whose entry in
    ``blocks`` is -1 (a fresh device block takes their place when they are loaded)."""

    blocks: list[int]
    num_tokens: int
    host: tuple[tuple[int, bytes], ...] = ()


class BlockManager:
    """Allocates slots for requests block by block, shares cached prefixes, tracks swap slots."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 num_host_blocks: int = 0) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.host = HostBlockAllocator(num_host_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.tables: dict[str, list[int]] = {}
        self.host_tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # chain hashes of each request's full blocks
        self._committed: dict[str, int] = {}  # leading blocks of each table already committed
        self._salts: dict[str, list[int]] = {}  # tokens that start a request's hash chain (lookup_prefix)
        self.prefix_queries = 0  # tokens looked up (at admission)
        self.prefix_hits = 0  # of which found cached
        self.host_tier = None  # flashserve.cache.host_tier.HostPrefixTier, or None
        self.host_tier_hits = 0  # of the hits, tokens brought back from the host tier
        # Partially filled blocks that ``fork`` shared (share_partial): the only blocks a running
        # request may write while another references them (full blocks are never written again);
        # a block leaves the set once it is back to one reference (``quiet_decodes``).
        self._shared_partial: set[int] = set()

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

    def block_tables(self, request_id: str) -> list[list[int]]:
        """The request's table of each group of layers (one here; ``flashserve.cache.kv_groups``)."""
        return [self.block_table(request_id)]

    def table_tail(self, request_id: str, start: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], int]:
        """The ids from column ``start`` on of the request's table, of each other group's table
        (none here), and the table's length: what a plan sends of a table the Worker holds the
        first ``start`` columns of."""
        table = self.tables.get(request_id, ())
        return (tuple(table[start:]) if len(table) > start else ()), (), len(table)

    # ----------------------------------------------------------------- prefix cache
    def _chain(self, request_id: str, token_ids: Sequence[int], num_full: int) -> list[bytes]:
        """Chain hashes of the first ``num_full`` blocks of ``token_ids`` (memoised per request)."""
        hashes = self._hashes.setdefault(request_id, [])
        bs = self.block_size
        while len(hashes) < num_full:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else self._chain_root(request_id, None),
                                     token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def _chain_root(self, request_id: str, root: bytes | None) -> bytes | None:
        """Parent hash of a request's first block: ``root``, salted by the request's salt if any."""
        salt = self._salts.get(request_id)
        return root if salt is None else hash_block(root, salt)

    def lookup_prefix(self, request_id: str, token_ids: list[int], salt: list[int] | None = None) -> PrefixHit:
        """Longest cached run of full blocks at the start of ``token_ids``, leaving at least the
        last token to compute (so the step has logits to sample from). Takes no references.
        ``salt``: tokens that start the request's hash chain, so that requests whose K/V differ
        for the same tokens (per-request attention options) share blocks only among themselves."""
        if salt is not None:
            self._salts[request_id] = salt
        if not self.enable_prefix_caching:
            return PrefixHit([], 0)
        num_full = (len(token_ids) - 1) // self.block_size
        blocks, host, tier = [], [], self.host_tier
        for h in self._chain(request_id, token_ids, num_full)[:num_full]:
            b = self.pool.cached.get(h)
            if b is None:
                if tier is None or h not in tier:
                    break
                host.append((len(blocks), h))
                b = -1
            blocks.append(b)
        return PrefixHit(blocks, len(blocks) * self.block_size, tuple(host))

    # ----------------------------------------------------------------- host tier
    def attach_host_tier(self, tier) -> None:
        """Save evicted cached blocks to ``tier`` (a ``HostPrefixTier``) and look them up there."""
        self.host_tier = tier
        self.pool.on_evict = tier.on_evict

    def take_host_tier_moves(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """(saves, loads) of the host tier for the plan being built (none without a tier)."""
        return self.host_tier.take_moves() if self.host_tier is not None else ((), ())

    def commit(self, request: Request) -> None:
        """Register the request's blocks that are full of computed (or being computed by a
        planned step) and known tokens in the cache. Blocks committed before are skipped, so a
        decode step costs O(1) here; the tokens are only sliced block by block."""
        if not self.enable_prefix_caching:
            return
        request_id, num_computed = request.request_id, request.num_computed_tokens
        done = self._committed.get(request_id, 0)
        if num_computed // self.block_size <= done:
            return
        table = self.tables.get(request_id)
        if not table:
            return
        bs, num_prompt, outputs = self.block_size, request.num_prompt_tokens, request.output_token_ids
        num_full = min(min(num_computed, num_prompt + len(outputs)) // bs, len(table))  # known tokens only
        if num_full <= done:
            return
        hashes = self._hashes.get(request_id)
        start = done * bs - num_prompt
        if num_full == done + 1 and start >= 0 and done and len(hashes) == done:
            # a decode's common case: one more block, of output tokens, chained to the last hash
            hashes.append(hash_block(hashes[-1], outputs[start : start + bs]))
        else:
            hashes = self._chain(request_id, request.known_tokens, num_full)
        for i in range(done, num_full):
            if table[i] not in self.pool.block_hash:
                self.pool.register(table[i], hashes[i])
        self._committed[request_id] = num_full

    # ----------------------------------------------------------------- allocation
    def allocate_slots(self, request_id: str, total_tokens: int, prefix: PrefixHit | None = None) -> list[int] | None:
        """Grow the request's table to hold ``total_tokens``, starting a new table with the
        ``prefix`` hit's blocks (shared, not copied); None (and no change) if the pool is short."""
        table = self.tables.setdefault(request_id, [])
        if prefix is None and -(-total_tokens // self.block_size) <= len(table):
            return table  # the common decode step: the last block has room
        reused = prefix.blocks if prefix is not None and not table else []
        host = prefix.host if reused else ()  # hits in the host tier: -1 in ``reused``
        extra = self.blocks_needed(total_tokens) - len(table) - len(reused) + len(host)
        # Cached blocks with no references count as free: reusing them takes them off that list.
        revived = sum(1 for b in reused if b >= 0 and self.pool.ref_counts[b] == 0)
        if extra + revived > self.pool.num_free:
            if not table:
                del self.tables[request_id]
            return None
        for b in reused:
            if b >= 0:
                self.pool.touch(b)
        # Claim the host hits before allocating: the allocation may evict (and save) device blocks,
        # and a save must not take a host block this step loads from.
        slots = [self.host_tier.claim(h) for _, h in host]
        fresh = iter(self.pool.allocate(extra) if extra > 0 else [])
        reused = [b if b >= 0 else next(fresh) for b in reused]
        for (i, h), slot in zip(host, slots):
            self.pool.register(reused[i], h)  # a device hit again for whoever asks next
            self.host_tier.load(slot, reused[i])
        table.extend(reused)
        table.extend(fresh)
        self.prefix_hits += len(reused) * self.block_size
        self.host_tier_hits += len(host) * self.block_size
        return table

    def quiet_decodes(self, request_ids: list[str], starts: np.ndarray, known: np.ndarray,
                      sent: np.ndarray, lens: np.ndarray | None = None) -> np.ndarray | None:
        """For running requests about to compute one token each, at positions ``starts`` (or
        ``lens`` tokens each from there, at most a block's worth: a multi-step plan), with
        ``known`` token values, whose tables' first ``sent`` columns the Worker holds (-1: none),
        what that step needs from this manager: 0 nothing (``allocate_slots``, ``trim``,
        ``assert_writable``, ``commit`` with the step counted as computed, and ``table_tail``
        would change and send nothing: the position falls in a block the table holds and only
        the request references, the Worker holds the whole table, no block is full past those
        committed); 1 only a fresh block for the position, which starts one (``append_blocks``);
        2 those calls, one request at a time. None when the manager cannot tell in bulk (every
        request then takes the calls)."""
        bs = self.block_size
        n = len(request_ids)
        have = np.fromiter(map(len, map(self.tables.get, request_ids, repeat(()))), np.int64, n)
        ends = starts + (1 if lens is None else lens)  # computed tokens after the step
        cols = (ends - 1) // bs  # the column of the last position
        whole = have == sent  # the Worker holds the whole table
        held = (cols < have) & whole
        if self._prune_shared_partial():  # a forked beam's partial block may have two users: a sole owner writes
            if lens is not None:
                return None
            tables = list(map(self.tables.get, request_ids, repeat(())))
            blocks = map(list.__getitem__, compress(tables, held), cols[held].tolist())
            held[held] = np.fromiter(map(self.pool.ref_counts.__getitem__, blocks), np.int64, int(held.sum())) == 1
        fresh = (cols == have) & whole & (starts <= cols * bs)  # the positions before the new block are held
        if self.enable_prefix_caching:
            full = np.minimum(ends, known) // bs  # full blocks of known, computed tokens (as commit)
            committed = full <= np.fromiter(map(self._committed.get, request_ids, repeat(0)), np.int64, n)
            held &= committed
            fresh &= committed
        needs = np.where(held, 0, np.where(fresh, 1, 2)).astype(np.int8)
        trims = self._trims(request_ids, starts, have)
        if trims is not None:
            needs[trims] = 2
        return needs

    def _trims(self, request_ids: list[str], starts: np.ndarray, have: np.ndarray) -> np.ndarray | None:
        """For ``quiet_decodes``: which requests' ``trim`` at ``starts`` releases a block (they take
        the per-request calls), given their table lengths ``have``; None: no request's (full
        attention never trims)."""
        return None

    def append_blocks(self, request_ids: list[str]) -> list[int]:
        """Append one fresh block to each request's table, in order: the blocks ``allocate_slots``
        would give them one request after another. The pool must hold them (MemoryError)."""
        blocks = self.pool.allocate(len(request_ids))
        consume(map(list.append, map(self.tables.__getitem__, request_ids), blocks))
        return blocks

    def trim(self, request_id: str, start: int) -> None:
        """Release blocks that a step starting at position ``start`` and every later one can no
        longer read: none with full attention (``flashserve.cache.window`` frees out-of-window ones)."""
    def fork(self, parent_id: str, child_id: str, num_tokens: int, share_partial: bool) -> list[tuple[int, int]] | None:
        """Give ``child_id`` the parent's K/V of its first ``num_tokens`` tokens (beam search):
        full blocks are shared (reference counted); a partially filled last block is shared too
        when ``share_partial`` (the caller retires the parent before the child writes, so the child
        then owns it alone), else copied into a fresh block: returns the (source, destination)
        block copies the Worker must make before the child's next step, or None (and no change)
        when the pool has no block for the copy."""
        table = self.tables[parent_id]
        bs = self.block_size
        n_full, partial = divmod(num_tokens, bs)
        shared = table[:n_full]
        copies: list[tuple[int, int]] = []
        child = list(shared)
        if partial:
            if share_partial:
                child.append(table[n_full])
                self._prune_shared_partial()
                self._shared_partial.add(table[n_full])
            else:
                if self.pool.num_free < 1:
                    return None
                dst = self.pool.allocate(1)[0]
                copies.append((table[n_full], dst))
                child.append(dst)
        for b in (child if partial and share_partial else shared):
            self.pool.incref(b)
        self.tables[child_id] = child
        return copies

    def _prune_shared_partial(self) -> set[int]:
        """The forked partial blocks that still have more than one reference."""
        shared, refs = self._shared_partial, self.pool.ref_counts
        if shared:
            shared.difference_update([b for b in shared if refs[b] <= 1])
        return shared

    def record_query(self, num_tokens: int) -> None:
        self.prefix_queries += num_tokens

    def assert_writable(self, request_id: str, start: int, end: int) -> None:
        """A step writes K/V of positions [start, end): none of their blocks may be shared."""
        table = self.tables[request_id]
        bs = self.block_size
        first, stop = start // bs, -(-end // bs)
        refs = self.pool.ref_counts
        if stop - first == 1 and refs[table[first]] == 1:
            return  # a decode step: one block, the common case
        for i in range(first, stop):
            if refs[table[i]] != 1:
                raise AssertionError(f"request {request_id} would write shared block {table[i]} "
                                     f"(refs {self.pool.ref_counts[table[i]]}); copy-on-write is never expected")

    def free(self, request_id: str) -> None:
        """Release every block the request holds (a no-op for unknown ids)."""
        self._hashes.pop(request_id, None)
        self._salts.pop(request_id, None)
        self._committed.pop(request_id, None)
        table = self.tables.pop(request_id, None)
        if table:
            # Tail first: the tail blocks, the least likely to be shared, are reused/evicted first.
            self.pool.free(list(reversed(table)))
        host = self.host_tables.pop(request_id, None)
        if host:
            self.host.free(host)

    # ----------------------------------------------------------------- swap
    def can_swap_out(self, request_id: str) -> bool:
        return len(self.tables.get(request_id, ())) <= self.host.num_free

    def swap_out(self, request_id: str) -> list[tuple[int, int]]:
        """Move the request's blocks to host slots: (device block, host block) pairs to copy.
        The device blocks are released (shared or cached ones stay alive for their other users)."""
        table = self.tables.pop(request_id)
        self._committed.pop(request_id, None)  # swapped back in, it gets new blocks
        host = self.host.allocate(len(table))
        self.host_tables[request_id] = host
        self.pool.free(list(reversed(table)))
        return list(zip(table, host))

    def swap_in(self, request_id: str) -> list[tuple[int, int]] | None:
        """Bring a swapped request back into fresh device blocks: (host, device) pairs, or None
        if the pool is short. Its host slots are released."""
        host = self.host_tables[request_id]
        if len(host) > self.pool.num_free:
            return None
        table = self.pool.allocate(len(host))
        self.tables[request_id] = table
        del self.host_tables[request_id]
        self.host.free(host)
        return list(zip(host, table))

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        if self.host_tier is not None:
            self.host_tier.check_invariants()
        refs = [0] * self.pool.num_blocks
        for table in self.tables.values():
            for b in table:
                refs[b] += 1
        assert refs == self.pool.ref_counts, "reference counts disagree with the block tables"
        held = [b for t in self.host_tables.values() for b in t]
        assert len(set(held)) == len(held)
        assert len(held) + self.host.num_free + len(self.host._pending) == self.host.num_blocks
