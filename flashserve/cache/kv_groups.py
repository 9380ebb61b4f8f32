"""KV memory tracked per attention type: one block table per group of layers of one memory kind.

A model whose layers need different amounts of context (Gemma 3: 5 local sliding-window layers to 1
global) keeps, per request, one block table per *group*: the layers of one memory kind (full, or a
window of ``span`` positions plus ``sinks``), ``slab`` layers per group. All groups draw from one
pool whose blocks hold ``slab`` layers each (the pool is ``[slab, 2, num_blocks, block_size, Hkv,
D]``): layer i reads ``pool[layer_slab[i]]`` through its group's table. A windowed group releases
the blocks out of its window (``flashserve.cache.window``) while a full group keeps the whole
context, so a long request on Gemma 3 holds the whole context in 3 of 18 layers only.

``slab`` is the size of the smallest memory kind; a larger kind is cut into groups of ``slab``
layers, the last one padded (its pages carry unused slab rows). A model with one memory kind has
one group of every layer: the plain layout, and the plain ``BlockManager`` / ``WindowedBlockManager``.

``GroupedBlockManager`` keeps the ``BlockManager`` interface the scheduler uses; each group is a
``WindowedBlockManager`` (a full group never trims) on the shared pool and host allocator, with
its own prefix-cache hash chain (salted by the group, so groups never share a block). A prefix hit
is the shortest hit over the groups; allocation succeeds for all groups or for none.

H2O layers (heavy hitters at a KV budget) are a memory kind too: their group keeps only the region
of compacted kept tokens (``flashserve.cache.window.EvictingBlockManager``) and never takes part in
prefix caching (so a model with an H2O group gets no prefix hits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashserve.cache.block_manager import BlockManager, BlockPool, HostBlockAllocator, PrefixHit, hash_block
from flashserve.cache.window import HOLE, EvictingBlockManager, WindowedBlockManager, h2o_kept
from flashserve.config import ModelConfig
from flashserve.request import Request


@dataclass(frozen=True)
class KVGroup:
    """Layers sharing one block table; ``span`` None: every position is kept; ``kv_budget``:
    H2O layers (the compacted kept tokens only)."""

    layers: tuple[int, ...]
    sinks: int = 0
    span: int | None = None
    kv_budget: float | None = None


@dataclass(frozen=True)
class KVLayout:
    groups: tuple[KVGroup, ...]
    slab: int  # layers per pool block
    layer_group: tuple[int, ...]  # group of each layer
    layer_slab: tuple[int, ...]  # row of the pool block each layer uses

    @property
    def num_groups(self) -> int:
        return len(self.groups)


def kv_layout(config: ModelConfig) -> KVLayout:
    """Group the layers by memory kind (see module docstring)."""
    kinds: dict[tuple[int, int | None, float | None], list[int]] = {}
    for i in range(config.num_layers):
        spec = config.layer_spec(i).attention
        if spec.kind == "sliding":
            key = (spec.num_sinks, spec.span, None)
        elif spec.kind == "h2o":
            key = (spec.num_sinks, None, spec.kv_budget)
        else:
            key = (0, None, None)
        kinds.setdefault(key, []).append(i)
    if len(kinds) == 1:
        (sinks, span, kv_budget), layers = next(iter(kinds.items()))
        return KVLayout((KVGroup(tuple(layers), sinks, span, kv_budget),), len(layers), (0,) * len(layers),
                        tuple(range(len(layers))))
    slab = min(len(v) for v in kinds.values())
    groups: list[KVGroup] = []
    layer_group, layer_slab = [0] * config.num_layers, [0] * config.num_layers
    for (sinks, span, kv_budget), layers in kinds.items():
        for start in range(0, len(layers), slab):
            chunk = layers[start : start + slab]
            for row, layer in enumerate(chunk):
                layer_group[layer], layer_slab[layer] = len(groups), row
            groups.append(KVGroup(tuple(chunk), sinks, span, kv_budget))
    return KVLayout(tuple(groups), slab, tuple(layer_group), tuple(layer_slab))


class _GroupTables(WindowedBlockManager):
    """One group's tables on a shared pool, with a salted hash chain."""

    def __init__(self, pool: BlockPool, host: HostBlockAllocator, block_size: int, enable_prefix_caching: bool,
                 group: KVGroup, index: int) -> None:
        evicting = group.kv_budget is not None  # H2O: compacted, never shared (flashserve.cache.window)
        super().__init__(1, block_size, enable_prefix_caching and not evicting, 0,
                         sinks=0 if evicting else group.sinks, span=group.span or 0)
        self.pool, self.host = pool, host
        self.group = group
        self.windowed = group.span is not None or evicting
        self._salt = hash_block(None, [-1 - index])

    def oldest_read(self, start: int) -> int:
        if self.group.kv_budget is not None:
            return start - h2o_kept(self.group.kv_budget, self.group.sinks, start)
        return super().oldest_read(start)

    def trim(self, request_id: str, start: int) -> None:
        if self.windowed:
            super().trim(request_id, start)

    def _chain(self, request_id, token_ids, num_full):
        hashes = self._hashes.setdefault(request_id, [])
        bs = self.block_size
        while len(hashes) < num_full:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else self._chain_root(request_id, self._salt),
                                     token_ids[i * bs : (i + 1) * bs]))
        return hashes


class GroupedPrefixHit(PrefixHit):
    """A prefix hit in every group: ``blocks`` is group 0's, ``group_blocks`` all of them."""

    def __init__(self, group_blocks: list[list[int]], num_tokens: int) -> None:
        super().__init__(group_blocks[0], num_tokens)
        self.group_blocks = group_blocks


class GroupedBlockManager(BlockManager):
    """Block tables per group of layers over one pool (see module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, num_host_blocks: int,
                 layout: KVLayout) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching, num_host_blocks)
        self.layout = layout
        self.groups = [_GroupTables(self.pool, self.host, block_size, enable_prefix_caching, g, i)
                       for i, g in enumerate(layout.groups)]
        self.tables = self.groups[0].tables  # group 0's tables (the BlockManager view)
        self.host_tables = self.groups[0].host_tables

    def block_tables(self, request_id: str) -> list[list[int]]:
        return [g.block_table(request_id) for g in self.groups]

    def table_tail(self, request_id: str, start: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], int]:
        main, *others = self.block_tables(request_id)
        return (tuple(main[start:]) if len(main) > start else ()), tuple(tuple(t[start:]) for t in others), len(main)

    def blocks_held(self, request_id: str) -> int:
        return sum(g.blocks_held(request_id) for g in self.groups)

    def blocks_needed(self, num_tokens: int) -> int:
        return len(self.groups) * -(-num_tokens // self.block_size)

    def lookup_prefix(self, request_id: str, token_ids: list[int], salt: list[int] | None = None) -> PrefixHit:
        hits = [g.lookup_prefix(request_id, token_ids, salt) for g in self.groups]
        n = min(len(h.blocks) for h in hits)
        return GroupedPrefixHit([h.blocks[:n] for h in hits], n * self.block_size)

    def commit(self, request: Request) -> None:
        for g in self.groups:
            g.commit(request)

    def allocate_slots(self, request_id: str, total_tokens: int, prefix: PrefixHit | None = None) -> list[int] | None:
        want = -(-total_tokens // self.block_size)
        need = 0
        for i, g in enumerate(self.groups):
            table = g.tables.get(request_id, [])
            reused = prefix.group_blocks[i] if isinstance(prefix, GroupedPrefixHit) and not table else []
            need += max(0, want - len(table) - len(reused)) + sum(1 for b in reused if self.pool.ref_counts[b] == 0)
        if need > self.pool.num_free:
            return None
        # Pin every group's hit blocks first: a group allocating fresh blocks may evict cached ones,
        # and must not take a block that a later group is about to reuse.
        pinned = [b for i, g in enumerate(self.groups) if not g.tables.get(request_id)
                  for b in (prefix.group_blocks[i] if isinstance(prefix, GroupedPrefixHit) else ())]
        for b in pinned:
            self.pool.touch(b)
        for i, g in enumerate(self.groups):
            hit = PrefixHit(prefix.group_blocks[i], prefix.num_tokens) if isinstance(prefix, GroupedPrefixHit) else None
            assert g.allocate_slots(request_id, total_tokens, hit) is not None
        self.pool.free(pinned)  # the groups' tables hold their own references now
        self.prefix_hits = self.groups[0].prefix_hits
        return self.groups[0].tables[request_id]

    def quiet_decodes(self, request_ids, starts, known, sent, lens=None) -> np.ndarray | None:
        """Each request takes the per-request calls (2), which give every group's new ids (a
        multi-step plan trims each windowed group at the plan's first position, as
        ``WindowedBlockManager._trims``). None (the per-request loop claims them, preempting
        if it must) when the pool may not hold a new block in every group for every request, or
        with an H2O group (its managers claim one step at a time)."""
        if len(request_ids) * len(self.groups) > self.pool.num_free or \
                any(g.group.kv_budget is not None for g in self.groups):
            return None
        return np.full(len(request_ids), 2, dtype=np.int8)

    def assert_writable(self, request_id: str, start: int, end: int) -> None:
        for g in self.groups:
            g.assert_writable(request_id, start, end)

    def trim(self, request_id: str, start: int) -> None:
        for g in self.groups:
            g.trim(request_id, start)

    def free(self, request_id: str) -> None:
        for g in self.groups:
            g.free(request_id)

    def can_swap_out(self, request_id: str) -> bool:
        if any(g.group.kv_budget is not None for g in self.groups):
            return False  # H2O scores do not travel (flashserve.cache.window): recompute instead
        return self.blocks_held(request_id) <= self.host.num_free

    def swap_out(self, request_id: str) -> list[tuple[int, int]]:
        return [pair for g in self.groups for pair in g.swap_out(request_id)]

    def swap_in(self, request_id: str) -> list[tuple[int, int]] | None:
        held = sum(1 for g in self.groups for h in g.host_tables[request_id] if h != HOLE)
        if held > self.pool.num_free:
            return None
        return [pair for g in self.groups for pair in g.swap_in(request_id)]

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        refs = [0] * self.pool.num_blocks
        for g in self.groups:
            for table in g.tables.values():
                for b in table:
                    if b != HOLE:
                        refs[b] += 1
        assert refs == self.pool.ref_counts, "reference counts disagree with the block tables"
        held = [b for g in self.groups for t in g.host_tables.values() for b in t if b != HOLE]
        assert len(set(held)) == len(held)
        assert len(held) + self.host.num_free + len(self.host._pending) == self.host.num_blocks


def make_block_manager(config: ModelConfig, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                       num_host_blocks: int, num_host_cache_blocks: int = 0) -> BlockManager:
    """The block manager for the model's layout: one table (plain, released out of the window when
    every layer is windowed, or below the kept tokens when every layer is H2O) or one per group.
    ``num_host_cache_blocks``: the host KV tier of the prefix cache (``flashserve.cache.host_tier``),
    host blocks after the swap slots."""
    layout = kv_layout(config)
    if layout.num_groups > 1:
        check_host_tier(layout, num_host_cache_blocks)
        return GroupedBlockManager(num_blocks, block_size, enable_prefix_caching, num_host_blocks, layout)
    group = layout.groups[0]
    if group.kv_budget is not None:
        if num_host_cache_blocks:
            raise ValueError("kv_host_cache_gb (the host KV tier of the prefix cache) does not combine with H2O "
                             "attention, whose blocks are never shared through the prefix cache; set kv_host_cache_gb=0")
        return EvictingBlockManager(num_blocks, block_size, enable_prefix_caching, num_host_blocks,
                                    kv_budget=group.kv_budget, sinks=group.sinks)
    if group.span is None:
        bm = BlockManager(num_blocks, block_size, enable_prefix_caching, num_host_blocks)
    else:
        bm = WindowedBlockManager(num_blocks, block_size, enable_prefix_caching, num_host_blocks,
                                  sinks=group.sinks, span=group.span)
    if num_host_cache_blocks and enable_prefix_caching:
        from flashserve.cache.host_tier import HostPrefixTier

        bm.attach_host_tier(HostPrefixTier(num_host_cache_blocks, first_id=num_host_blocks))
    return bm


def check_host_tier(layout: KVLayout, num_host_cache_blocks: int) -> None:
    """Refuse the host KV tier for models whose layers keep several block tables: a hit would have
    to come back in every group at once, which the tier does not do."""
    if num_host_cache_blocks and layout.num_groups > 1:
        raise ValueError(f"kv_host_cache_gb (the host KV tier of the prefix cache) is not supported for models whose "
                         f"layers keep different KV spans ({layout.num_groups} groups, e.g. Gemma 3's local and "
                         f"global layers); set kv_host_cache_gb=0")
