"""Block manager: exact block ids, reference counts, freeing, exhaustion."""

import pytest

from flashserve.cache.block_manager import BlockManager, BlockPool


def test_pool_hands_out_lowest_ids_first_and_counts_references():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    assert pool.ref_counts == [1, 1, 0, 0]
    pool.incref(1)
    pool.free([1])
    assert pool.ref_counts[1] == 1 and pool.num_free == 2  # still held by the second reference
    pool.free([1])
    assert pool.num_free == 3
    assert pool.allocate(3) == [2, 3, 1]  # freed blocks go to the back of the free list


def test_pool_refuses_double_free_and_incref_of_free_block():
    pool = BlockPool(2)
    [b] = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([b])
    with pytest.raises(RuntimeError, match="incref of free block"):
        pool.incref(b)


def test_pool_exhaustion_names_the_numbers():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(MemoryError, match="asked for 2 KV blocks, only 1 free"):
        pool.allocate(2)
    with pytest.raises(ValueError):
        BlockPool(0)


def test_manager_grows_tables_block_by_block():
    bm = BlockManager(num_blocks=6, block_size=4)
    assert bm.allocate_slots("a", 5) == [0, 1]  # 5 tokens -> 2 blocks
    assert bm.allocate_slots("b", 4) == [2]
    assert bm.allocate_slots("a", 8) == [0, 1]  # still fits in 2 blocks
    assert bm.allocate_slots("a", 9) == [0, 1, 3]
    assert bm.num_free_blocks == 2
    assert bm.allocate_slots("c", 13) is None  # needs 4, only 2 free: nothing changes
    assert "c" not in bm.tables and bm.num_free_blocks == 2
    bm.free("a")
    assert bm.num_free_blocks == 5
    # Freed in reverse order: the tail block (3) comes back first.
    assert bm.allocate_slots("c", 13) == [4, 5, 3, 1]
    bm.free("unknown")  # no-op
    bm.free("b"); bm.free("c")
    assert bm.num_free_blocks == 6 and all(r == 0 for r in bm.pool.ref_counts)


def test_block_size_one_is_token_granular():
    bm = BlockManager(num_blocks=5, block_size=1)
    assert bm.allocate_slots("a", 3) == [0, 1, 2]
    assert bm.allocate_slots("a", 4) == [0, 1, 2, 3]
    assert bm.num_free_blocks == 1


def test_quiet_decodes_sees_a_forked_partial_block_until_one_user_is_left():
    import numpy as np

    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate_slots("p", 7)  # blocks 0, 1: position 6 falls in the partially filled block 1
    bm.allocate_slots("q", 3)
    starts, known, sent = np.array([6, 2]), np.array([6, 2]), np.array([2, 1])
    assert bm.quiet_decodes(["p", "q"], starts, known, sent).tolist() == [0, 0]
    bm.fork("p", "c", 6, share_partial=True)  # block 1 has two users now
    assert bm.quiet_decodes(["p", "q"], starts, known, sent).tolist() == [2, 0]
    bm.free("p")  # the parent retired: the child owns the block alone
    assert bm.quiet_decodes(["c", "q"], starts, known, sent).tolist() == [0, 0]
    assert not bm._shared_partial
