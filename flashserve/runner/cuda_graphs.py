"""Static step buffers and CUDA graphs over them: decode steps and small mixed steps.

Every step's inputs are written into one set of static device buffers (``StepBuffers``), and
the forward pass reads slices of them, so a captured graph can replay any step of its shape:

* decode graphs, one per batch size of a ladder (1, 2, 4, 8, 16, 24, 32, 48, ... up to
  max_num_seqs): B sequences of one new token each, split-KV decode attention;
* greedy graphs (given the LM head), one per decode size: the decode graph, then the head and the
  argmax of its logits, for steps whose rows are all plain greedy. Such a step launches one
  replay where it launched the replay, the head's products and the argmax (a GPU host pays
  tens of microseconds of Python and driver time per launch);
* mixed graphs, one per token-count bucket (8, 16, 32, ... up to ``max_mixed_tokens``): any mix of
  prompt chunks and decodes with at most that many tokens, prefill attention whose grid covers
  ``min(bucket, max_num_seqs)`` sequences of up to ``bucket`` new tokens each. The 8-token
  bucket serves a speculative step of one or two sequences with short chains (k <= 7 at batch
  1): padded to 16 rows instead, its products left the few-row paths (GGUF GEMV, up to 8 rows)
  for the tiled ones (H200, SmolLM2 Q4_1: a 5-token verification forward took 121 x 22 us of
  flat GEMMs against ~6 us per product at 5 rows).

* tree graphs (with speculative token trees), one per mixed bucket up to ``MAX_TREE_GRAPH_TOKENS``:
  the same steps with tree-masked attention (``flashserve.kernels.tree_attention``), whose masks
  (ancestor bits and depths per token, tree size per sequence) live in more rows of the token and
  sequence buffers. A sequence without a tree has size 0 there and attends causally.

A step is padded to its graph's size: padding tokens have slot -1 (nothing stored), position 0,
and belong to no sequence; padding sequences own no token and have no context, so their
attention programs exit at once. Their hidden rows are ignored. All graphs share one memory
pool, captured largest first. The attention backend sizes grids from host numbers only (see
``flashserve.kernels.triton_backend``), so one graph serves every context length.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from flashserve.kernels.tree_mask import TreeMask
from flashserve.layers.attention_metadata import AttentionMetadata, forward_context

MAX_TREE_GRAPH_TOKENS = 256  # tree steps with more tokens run eagerly


def decode_ladder(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]
    return [s for s in sizes if s < max_batch] + [max_batch]


def mixed_ladder(max_tokens: int) -> list[int]:
    sizes, s = [], 8
    while s < max_tokens:
        sizes.append(s)
        s *= 2
    return sizes + [max_tokens] if max_tokens > 0 else []


class StepBuffers:
    """The static device tensors one step's model inputs live in."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device: torch.device,
                 num_groups: int = 1, trees: bool = False, lora: bool = False) -> None:
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        # rows of one tensor each, so a step writes them with one copy: token ids, positions, cache
        # slots and those of layer groups 1, 2, ... (flashserve.cache.kv_groups) [3 + G, max_tokens];
        # query starts and context lengths [2, max_seqs + 1]. With ``lora``, each token's adapter
        # (flashserve.lora, -1: none) in one more token row. With ``trees``, a token tree's
        # ancestor bits and depths (two more token rows) and its size per sequence (a third row).
        self.trees = trees
        groups = num_groups - 1
        self.slot_rows_end = 3 + groups
        self.tree_row = self.slot_rows_end + lora
        self.token_inputs = torch.zeros(self.tree_row + (2 if trees else 0), max_tokens, **i64)
        self.input_ids, self.positions, self.slot_mapping = self.token_inputs[:3].unbind(0)
        self.group_slot_mapping = list(self.token_inputs[3 : 3 + groups].unbind(0))
        self.lora_ids = self.token_inputs[self.slot_rows_end] if lora else None
        self.token_inputs[2 : self.tree_row].fill_(-1)
        self.seq_inputs = torch.zeros(3 if trees else 2, max_seqs + 1, **i32)
        self.query_start_loc = self.seq_inputs[0]
        self.seq_lens = self.seq_inputs[1, :max_seqs]
        self.block_tables = torch.zeros(max_seqs, max_blocks_per_seq, **i32)
        self.group_block_tables = [torch.zeros(max_seqs, max_blocks_per_seq, **i32) for _ in range(groups)]
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs

    def tree_mask(self, num_tokens: int, num_seqs: int) -> TreeMask:
        """The token-tree masks in the buffers (``trees``), for a graph's capture. The host copy of
        the tree sizes is empty: the Triton kernel reads the device's."""
        return TreeMask(self.token_inputs[self.tree_row, :num_tokens], self.seq_inputs[2, :num_seqs], [],
                        self.token_inputs[self.tree_row + 1, :num_tokens])

    def metadata(self, num_tokens: int, num_seqs: int, max_query_len: int, max_seq_len: int, block_size: int,
                 query_lens: list[int], seq_lens: list[int], is_decode: bool) -> AttentionMetadata:
        def meta(block_tables: torch.Tensor, slot_mapping: torch.Tensor, groups=()) -> AttentionMetadata:
            return AttentionMetadata(
                query_start_loc=self.query_start_loc[: num_seqs + 1],
                seq_lens=self.seq_lens[:num_seqs],
                block_tables=block_tables[:num_seqs],
                slot_mapping=slot_mapping[:num_tokens],
                max_query_len=max_query_len,
                max_seq_len=max_seq_len,
                query_lens_cpu=query_lens,
                seq_lens_cpu=seq_lens,
                block_size=block_size,
                is_decode=is_decode,
                groups=groups,
            )

        groups = tuple(meta(t, s) for t, s in zip(self.group_block_tables, self.group_slot_mapping))
        return meta(self.block_tables, self.slot_mapping, groups)


class CudaGraphs:
    """Captured forwards over ``StepBuffers``: decode and greedy graphs by batch size, mixed (and
    tree) graphs by token count."""

    def __init__(self, model: torch.nn.Module, kv_caches: list, buffers: StepBuffers, block_size: int,
                 max_seq_len: int, max_decode_batch: int, max_mixed_tokens: int,
                 head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model = model
        self.head = head  # hidden [B, H] -> fp32 logits [B, V]: with it, greedy graphs too
        self.kv_caches = kv_caches
        self.buf = buffers
        self.block_size = block_size
        self.max_seq_len = max_seq_len
        self.decode_sizes = decode_ladder(min(max_decode_batch, buffers.max_seqs, buffers.max_tokens))
        self.mixed_sizes = mixed_ladder(min(max_mixed_tokens, buffers.max_tokens))
        self.tree_sizes = [s for s in self.mixed_sizes if s <= MAX_TREE_GRAPH_TOKENS] if buffers.trees else []
        self.greedy_sizes = self.decode_sizes if head is not None else []
        self.graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.argmax: dict[int, torch.Tensor] = {}  # a greedy graph's sampled ids [B], by its size
        self.capture_seconds = 0.0

    def _shape(self, kind: str, size: int) -> tuple[int, int, int]:
        """(tokens, sequences, max query length) a graph is captured for."""
        if kind in ("decode", "greedy"):
            return size, size, 1
        return size, min(size, self.buf.max_seqs), size

    def _meta(self, kind: str, size: int) -> AttentionMetadata:
        t, b, q = self._shape(kind, size)
        meta = self.buf.metadata(t, b, q, self.max_seq_len, self.block_size, [q] * b, [self.max_seq_len] * b,
                                 kind in ("decode", "greedy"))
        if kind == "tree":
            tree = self.buf.tree_mask(t, b)
            for m in (meta, *meta.groups):
                m.tree = tree
        return meta

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every graph; returns the seconds it took."""
        start = time.perf_counter()
        buf = self.buf
        pool = None
        work = [("mixed", s) for s in self.mixed_sizes] + [("tree", s) for s in self.tree_sizes] + \
            [("decode", s) for s in self.decode_sizes] + [("greedy", s) for s in self.greedy_sizes]
        work.sort(key=lambda ks: -self._shape(*ks)[0])  # largest first: later graphs reuse the pool
        for kind, size in work:
            t, b, _ = self._shape(kind, size)
            # Inputs that touch nothing: no sequence owns a token, nothing is stored.
            buf.query_start_loc[: b + 1].zero_()
            buf.seq_lens[:b].zero_()
            buf.slot_mapping[:t].fill_(-1)
            for slots in buf.group_slot_mapping:
                slots[:t].fill_(-1)
            with forward_context(self._meta(kind, size)):
                self._run(kind, t)  # warm-up compiles kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # fresh metadata: what a backend memoises per step (``meta.memo``) must be computed inside
            # the graph, not reused from the warm-up, whose tensors are freed after capture
            with torch.cuda.graph(graph, pool=pool), forward_context(self._meta(kind, size)):
                out, ids = self._run(kind, t)
            pool = graph.pool()
            self.graphs[(kind, size)] = (graph, out)
            if ids is not None:
                self.argmax[size] = ids
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        return self.capture_seconds

    def _run(self, kind: str, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The captured work: the forward's hidden states, and a greedy graph's argmax ids."""
        buf = self.buf
        hidden = self.model(buf.input_ids[:num_tokens], buf.positions[:num_tokens], self.kv_caches)
        return hidden, self.head(hidden).argmax(dim=-1) if kind == "greedy" else None

    def pick(self, num_tokens: int, num_seqs: int, is_decode: bool, tree: bool = False,
             greedy: bool = False) -> tuple[str, int] | None:
        """The graph that serves a step (``tree``: one with token trees; ``greedy``: a decode step
        whose rows are all plain greedy, a greedy graph where there is one), or None (run eager)."""
        if tree:
            return next((("tree", s) for s in self.tree_sizes
                         if s >= num_tokens and min(s, self.buf.max_seqs) >= num_seqs), None)
        if is_decode:
            kind = "greedy" if greedy and self.greedy_sizes else "decode"
            for s in self.decode_sizes:
                if s >= num_seqs:
                    return (kind, s)
        for s in self.mixed_sizes:
            if s >= num_tokens and min(s, self.buf.max_seqs) >= num_seqs:
                return ("mixed", s)
        return None

    def padded_shape(self, key: tuple[str, int]) -> tuple[int, int]:
        """(tokens, sequences) of a graph: the step is padded to this."""
        t, b, _ = self._shape(*key)
        return t, b

    def replay(self, key: tuple[str, int], num_tokens: int) -> torch.Tensor:
        graph, out = self.graphs[key]
        graph.replay()
        return out[:num_tokens]

    def sampled(self, key: tuple[str, int] | None, num_seqs: int) -> torch.Tensor | None:
        """The ids [num_seqs] a greedy graph's last replay sampled (a static buffer: the next
        replay of that graph rewrites it), or None for any other graph."""
        if key is None or key[0] != "greedy":
            return None
        return self.argmax[key[1]][:num_seqs]
