"""Random paged-KV batches for kernel tests, correctness checks and benchmarks.

``RandomPagedBatch`` builds a consistent (q, new k/v, paged cache, AttentionMetadata) set for
given per-sequence context and query lengths; used by ``tests/kernels`` and
``benchmarks/gpu_kernels_check.py`` (and meant for ``flashserve bench kernels``).
"""

from __future__ import annotations

import torch

from flashserve.layers.attention_metadata import AttentionMetadata


class RandomPagedBatch:
    """A random batch: each sequence has ``seq_len`` context tokens of which the last
    ``q_len`` are new this step. The cache holds random (non-zero) K/V for the cached part
    and garbage for the new slots; blocks are assigned in a shuffled order so the block table
    is non-trivial. ``k_new``/``v_new`` hold the new tokens' K/V (not yet stored)."""

    def __init__(self, seq_lens: list[int], q_lens: list[int], num_heads: int, num_kv_heads: int,
                 head_dim: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 seed: int = 0, extra_blocks: int = 3) -> None:
        assert all(0 <= q <= s for q, s in zip(q_lens, seq_lens))
        gen = torch.Generator().manual_seed(seed)
        self.seq_lens, self.q_lens = seq_lens, q_lens
        self.block_size = block_size
        blocks_per_seq = [-(-s // block_size) for s in seq_lens]
        num_blocks = sum(blocks_per_seq) + extra_blocks
        max_blocks = max(blocks_per_seq + [1]) + 1  # one padding column past the longest
        perm = torch.randperm(num_blocks, generator=gen)
        table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
        used = 0
        for b, n in enumerate(blocks_per_seq):
            table[b, :n] = perm[used:used + n].int()
            used += n

        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(dtype).to(device)

        self.k_cache = rnd(num_blocks, block_size, num_kv_heads, head_dim)
        self.v_cache = rnd(num_blocks, block_size, num_kv_heads, head_dim)
        num_tokens = sum(q_lens)
        self.q = rnd(num_tokens, num_heads, head_dim)
        self.k_new = rnd(num_tokens, num_kv_heads, head_dim)
        self.v_new = rnd(num_tokens, num_kv_heads, head_dim)
        slots = []
        for b, (s, q) in enumerate(zip(seq_lens, q_lens)):
            for pos in range(s - q, s):
                slots.append(int(table[b, pos // block_size]) * block_size + pos % block_size)
        qsl = [0]
        for q in q_lens:
            qsl.append(qsl[-1] + q)
        self.meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=table.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            max_query_len=max(q_lens + [0]),
            max_seq_len=max(seq_lens + [0]),
            query_lens_cpu=list(q_lens),
            seq_lens_cpu=list(seq_lens),
            block_size=block_size,
            is_decode=all(q == 1 for q in q_lens),
        )

    def store_new_with_reference(self) -> None:
        """Put the new tokens' K/V into the cache with the torch reference."""
        from flashserve.kernels.reference import store_kv_ref

        store_kv_ref(self.k_new, self.v_new, self.k_cache, self.v_cache, self.meta.slot_mapping)

    def attention_args(self) -> tuple:
        m = self.meta
        return (self.q, self.k_cache, self.v_cache, m.query_start_loc, m.seq_lens, m.block_tables)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``torch.testing.assert_close`` tolerances for kernel-vs-reference checks (O(1) outputs)."""
    if dtype == torch.float32:
        return {"atol": 2e-5, "rtol": 1e-4}
    if dtype == torch.float16:
        return {"atol": 5e-3, "rtol": 5e-3}
    return {"atol": 2e-2, "rtol": 1e-2}
