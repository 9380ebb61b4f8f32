"""CUDA graphs for decode steps.

A decode step launches hundreds of small kernels; replaying a captured graph removes their
launch cost. One graph is captured per batch size of a ladder (1, 2, 4, 8, 16, 32, 48, 64, 96,
128, ... up to max_num_seqs); a step with B sequences replays the graph of the next size up,
with the padding sequences given no new token and no context (their attention programs exit at
once, their cache writes are skipped with slot -1, their hidden rows are ignored).

All graphs read their inputs from one set of static buffers and share one memory pool
(captured largest first). The attention backend sizes its decode split count from
``max_seq_len_cap`` during capture, so one graph serves every context length.
"""

from __future__ import annotations

import time

import torch

from flashserve.layers.attention_metadata import AttentionMetadata, forward_context


def batch_ladder(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]
    ladder = [s for s in sizes if s < max_batch]
    return ladder + [max_batch]


class DecodeGraphs:
    """Captured decode forwards, one per batch size of the ladder."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        max_batch: int,
        max_blocks_per_seq: int,
        max_seq_len: int,
        block_size: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.sizes = batch_ladder(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_seq_len = max_seq_len
        self.block_size = block_size
        n = self.max_batch
        i32 = dict(dtype=torch.int32, device=device)
        # Static inputs: every graph reads slices of these.
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.zeros(n + 1, **i32)
        self.seq_lens = torch.zeros(n, **i32)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, **i32)
        self._arange = torch.arange(n + 1, **i32)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0

    def padded_size(self, batch: int) -> int | None:
        """The ladder size that serves ``batch`` sequences, or None when it is too large."""
        for s in self.sizes:
            if s >= batch:
                return s
        return None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            slot_mapping=self.slot_mapping[:b],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            query_lens_cpu=[1] * b,
            seq_lens_cpu=[self.max_seq_len] * b,
            block_size=self.block_size,
            is_decode=True,
        )

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every ladder size; returns the seconds it took."""
        start = time.perf_counter()
        # Dummy inputs: one context token per sequence, nothing stored.
        self.seq_lens.fill_(1)
        self.query_start_loc.copy_(self._arange)
        pool = None
        for b in reversed(self.sizes):
            meta = self._meta(b)
            with forward_context(meta):
                self.model(self.input_ids[:b], self.positions[:b], self.kv_caches)  # warm-up, compiles kernels
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), forward_context(meta):
                out = self.model(self.input_ids[:b], self.positions[:b], self.kv_caches)
            pool = graph.pool()
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        return self.capture_seconds

    def run(
        self,
        input_ids: torch.Tensor,  # [B] int64, pinned host
        positions: torch.Tensor,  # [B] int64, pinned host
        slot_mapping: torch.Tensor,  # [B] int64, pinned host
        seq_lens: torch.Tensor,  # [B] int32, pinned host
        block_tables: torch.Tensor,  # [B, W] int32, pinned host
    ) -> torch.Tensor:  # [B, hidden]
        """Copy one decode step's inputs into the static buffers and replay the graph."""
        b = input_ids.shape[0]
        size = self.padded_size(b)
        assert size is not None, f"batch {b} exceeds the largest captured graph ({self.max_batch})"
        nb = dict(non_blocking=True)
        self.input_ids[:b].copy_(input_ids, **nb)
        self.positions[:b].copy_(positions, **nb)
        self.slot_mapping[:b].copy_(slot_mapping, **nb)
        self.seq_lens[:b].copy_(seq_lens, **nb)
        self.block_tables[:b, : block_tables.shape[1]].copy_(block_tables, **nb)
        # Sequence i owns token i; padding sequences own none and have no context.
        self.query_start_loc[: b + 1].copy_(self._arange[: b + 1])
        if size > b:
            self.query_start_loc[b + 1 : size + 1].fill_(b)
            self.seq_lens[b:size].fill_(0)
            self.slot_mapping[b:size].fill_(-1)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:b]
