"""A host-memory tier for the prefix cache: evicted prefix blocks kept by hash. Pure Python.

Without it, a cached prefix block (full, hashed, no references) that the device pool evicts to
make room is lost, and a later request with that prefix recomputes it. With a tier of
``num_blocks`` host blocks (``kv_host_cache_gb``), the eviction instead *saves* the block: the
block manager records a (device block, host block) copy that the Worker executes before the
step that reuses the device block; a later prefix lookup that misses the device cache but finds
the hash here *loads* it back: a fresh device block, a (host block, device block) copy executed
before the forward pass, and the block is registered in the device cache again, so the request
starts past it as on a device hit.

The copies travel in the plan (``BlockCopy.host_save`` and ``BlockCopy.swap_in``) and the
Worker performs them with the swap-preemption machinery (``flashserve.runner.swap``): the tier's
host blocks are the host swap space's blocks ``first_id ...``, after the swap slots.

Order within one step, why it is safe:
* saves run first (before fork copies, swap-outs and swap-ins), so an evicted device block is
  read before its new owner writes it, and a block saved and hit in the same step is on the host
  before it is loaded;
* a hit *moves* the block (the host entry is dropped) and its host block is freed only at the
  next step (``HostBlockAllocator``'s deferred frees), so no save of the same step overwrites a
  host block that a load reads;
* when the tier is full a save reuses the least recently used entry's host block at once: that
  entry is still in the tier, so no load of this step reads it.
"""

from __future__ import annotations

from collections import OrderedDict

from flashserve.cache.block_manager import HostBlockAllocator


class HostPrefixTier:
    """Prefix-cache blocks in host memory, keyed by chain hash, least recently saved evicted first."""

    def __init__(self, num_blocks: int, first_id: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError(f"the host KV tier needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.first_id = first_id  # host block ids are first_id ... first_id + num_blocks - 1
        self._slots = HostBlockAllocator(num_blocks)
        self._entries: OrderedDict[bytes, int] = OrderedDict()  # hash -> host block id, oldest first
        self._saves: list[tuple[int, int]] = []  # (device block, host block), not yet sent
        self._loads: list[tuple[int, int]] = []  # (host block, device block), not yet sent
        self.num_saved = 0  # blocks saved since start
        self.num_loaded = 0  # blocks brought back (host hits)
        self.num_dropped = 0  # entries overwritten because the tier was full

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._entries

    def on_evict(self, device_block: int, block_hash: bytes) -> None:
        """The device pool evicts ``device_block`` holding ``block_hash``: keep a copy here."""
        if block_hash in self._entries:  # recomputed after it was saved: the host copy is as good
            self._entries.move_to_end(block_hash)
            return
        if self._slots.num_free:
            slot = self.first_id + self._slots.allocate(1)[0]
        elif self._entries:
            _, slot = self._entries.popitem(last=False)
            self.num_dropped += 1
        else:
            return  # every host block is a load's source this step
        self._entries[block_hash] = slot
        self._saves.append((device_block, slot))
        self.num_saved += 1

    def claim(self, block_hash: bytes) -> int:
        """Take the entry of a hit out of the tier; its host block (returned) stays intact until the
        next step, when it is freed."""
        slot = self._entries.pop(block_hash)
        self._slots.free([slot - self.first_id])
        self.num_loaded += 1
        return slot

    def load(self, host_block: int, device_block: int) -> None:
        """Record the copy of a claimed host block into its fresh device block."""
        self._loads.append((host_block, device_block))

    def take_moves(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """The saves and loads recorded since the last call, for the plan being built; the host
        blocks freed by earlier claims become reusable from here on."""
        saves, loads = tuple(self._saves), tuple(self._loads)
        self._saves.clear()
        self._loads.clear()
        self._slots.begin_step()
        return saves, loads

    def cancel_saves(self) -> None:
        """Forget the saves not sent yet (their device blocks are overwritten outside a plan, e.g.
        by ``LLMEngine.score``): those entries are dropped, their host blocks freed."""
        for _, slot in self._saves:
            for h, s in list(self._entries.items()):
                if s == slot:
                    del self._entries[h]
                    self._slots.free([slot - self.first_id])
        self._saves.clear()

    def check_invariants(self) -> None:
        slots = list(self._entries.values())
        assert len(set(slots)) == len(slots), "two hashes share a host block"
        assert all(self.first_id <= s < self.first_id + self.num_blocks for s in slots)
        free = len(self._slots._free) + len(self._slots._pending)
        assert len(slots) + free == self.num_blocks, "host tier blocks lost or duplicated"
