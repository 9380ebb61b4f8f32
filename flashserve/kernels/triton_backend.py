"""``TritonAttentionBackend``: the GPU attention backend built on the paged Triton kernels.

Per layer call: ``store_kv`` writes the step's new K/V into the paged cache, then

* the split-KV decode kernel when every sequence has few new tokens
  (``meta.is_decode`` or ``meta.max_query_len <= decode_max_query_len``, and the rows
  ``next_pow2(max_query_len) * next_pow2(group)`` fit the kernel's 128-row tile) - this covers
  plain decode and speculative verification (1 + k tokens, causal among themselves);
* otherwise the FlashAttention-2 prefill kernel (prompt chunks, mixed batches).

No host synchronisation: grid sizes come from the host lists in ``AttentionMetadata``
(``num_seqs``, ``max_query_len``, ``max_seq_len``), never from device tensors.

CUDA graphs (decode): the captured grids are (T) for store_kv, (B, Hkv, num_splits) for the
split kernel and (T, Hq) for the reduction, with B/T the padded batch. ``num_splits`` is a host
decision: while a CUDA graph is being captured it is computed from ``max_seq_len_cap`` (when
given) instead of the live ``meta.max_seq_len``, so one captured graph serves every context
length up to the cap (``num_splits=`` pins it outright). Each sequence's slice length is derived from
its own ``seq_lens`` entry inside the kernel, so any split count is correct for any length;
the cap only tunes parallelism. Padding sequences should have query length 0 (their programs
exit at once) or a valid 1-token context.

Batch-invariant mode (``batch_invariant=True``, ``flashserve.layers.batch_invariant``): the split
count is fixed by ``max_seq_len_cap`` alone, and every new token of a sequence with at most
``INVARIANT_MAX_QUERY`` new tokens (decode, speculative verification, a short prompt chunk) is
attended as its own one-token decode row: the rows are built on the device from the step's
metadata (so they work inside CUDA graphs), with the token's own context length and its
sequence's block table. A token then gets the same bits as in a one-token decode step of any
batch. Longer prompt chunks go through the prefill kernel; a step holding both runs both and
keeps each token's row from its own path.
"""

from __future__ import annotations

import torch

from flashserve.config import MAX_SPECULATIVE_TOKENS, AttentionSpec
from flashserve.kernels.cache_ops import store_kv, store_kv_args
from flashserve.kernels.decode_attention import (
    MAX_DECODE_ROWS,
    choose_num_splits,
    decode_block_n,
    paged_decode_attention,
)
from flashserve.kernels.prefill_attention import paged_prefill_attention
from flashserve.kernels.tree_attention import tree_attention
from flashserve.kernels.utils import next_power_of_2, num_sms
from flashserve.layers.attention_metadata import AttentionBackend, AttentionMetadata
from flashserve.layers.request_attention import option_batches
from flashserve.layers.sparse_attention import SideStates, quest_block_tables, quest_num_pages


FULL = AttentionSpec()
# Quest reads ~budget x context tokens scattered over its chosen pages: slices of one kernel tile
# (not four, as for contiguous contexts): batch 1 at 32k, 64 slices 46 us/layer against 49 for 16.
QUEST_MIN_BLOCKS_PER_SPLIT = 1
# batch-invariant mode: sequences with at most this many new tokens attend token by token as decode
# rows (a speculative chain's 1 + k tokens, k <= MAX_SPECULATIVE_TOKENS)
INVARIANT_MAX_QUERY = MAX_SPECULATIVE_TOKENS + 1


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class TritonAttentionBackend(AttentionBackend):
    """Paged attention with Triton kernels (see module docstring for routing and graphs)."""

    name = "triton"
    attention_kinds = ("full", "sliding", "quest")

    def __init__(
        self,
        decode_max_query_len: int = 16,
        max_seq_len_cap: int | None = None,
        unified_max: float | None = None,
        num_splits: int | None = None,
        batch_invariant: bool = False,
    ) -> None:
        """
        decode_max_query_len: largest per-sequence new-token count sent to the decode kernel
            (16: verification of up to 15 drafts; the prefill kernel does not split the context,
            so a short step at a long context would leave most SMs idle there).
        max_seq_len_cap: context bound used to size num_splits under CUDA-graph capture,
            e.g. the model's max length (eager calls use meta.max_seq_len).
        unified_max: phi for FlashDecoding++'s asynchronised softmax (None: online softmax).
        num_splits: fixed split count of decode and tree steps (overrides the heuristic).
        batch_invariant: decode rows token by token, splits from max_seq_len_cap (module docstring).
        """
        if batch_invariant and max_seq_len_cap is None:
            raise ValueError("the batch-invariant mode fixes its split count from max_seq_len_cap; give one")
        self.decode_max_query_len = decode_max_query_len
        self.max_seq_len_cap = max_seq_len_cap
        self.unified_max = unified_max
        self.num_splits = num_splits
        self.batch_invariant = batch_invariant
        self.side_states = SideStates()  # quest: per-page key bounds of each layer

    def use_decode_kernel(self, meta: AttentionMetadata, num_heads: int, num_kv_heads: int) -> bool:
        rows = next_power_of_2(max(1, meta.max_query_len)) * next_power_of_2(num_heads // num_kv_heads)
        small = meta.is_decode or meta.max_query_len <= self.decode_max_query_len
        return small and rows <= MAX_DECODE_ROWS

    def decode_num_splits(self, meta: AttentionMetadata, q: torch.Tensor, k_cache: torch.Tensor) -> int:
        """Split count from host numbers only (see module docstring)."""
        if self.num_splits is not None:
            return self.num_splits
        block_n = decode_block_n(q.shape[2], q.dtype, k_cache.dtype)
        if self.batch_invariant:  # the batch-1 choice for the longest context, whatever the step
            return choose_num_splits(1, k_cache.shape[2], self.max_seq_len_cap, num_sms(q.device), block_n)
        return choose_num_splits(meta.num_seqs, k_cache.shape[2], self.seq_bound(meta), num_sms(q.device), block_n)

    def seq_bound(self, meta: AttentionMetadata) -> int:
        """The context bound that sizes split counts: ``max_seq_len_cap`` while a CUDA graph is
        captured (the graph replays for any length up to it), else the step's longest context."""
        return self.max_seq_len_cap if self.max_seq_len_cap is not None and _capturing() else meta.max_seq_len

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        spec: AttentionSpec = FULL,
    ) -> torch.Tensor:  # [T, Hq, D]
        if meta.tree is not None:  # a speculative token tree (flashserve.kernels.tree_attention)
            if self.batch_invariant:
                raise ValueError("the batch-invariant mode verifies chains, not token trees")
            return tree_attention(q, k, v, k_cache, v_cache, meta, scale, spec, max_seq_len=self.seq_bound(meta),
                                  num_splits=self.num_splits)
        out = torch.empty_like(q)
        if spec.kind == "quest":
            return self._quest(q, k, v, k_cache, v_cache, meta, scale, spec, out)
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.seq_attention is not None and spec.kind == "full":
            # requests with their own attention options (flashserve.layers.request_attention):
            # one launch per option over that option's sequences
            for option, sub, tokens in option_batches(meta):
                out.index_copy_(0, tokens, self._attend(q.index_select(0, tokens), k_cache, v_cache, sub, scale, option))
            return out
        return self._attend(q, k_cache, v_cache, meta, scale, spec, out)

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float, spec: AttentionSpec, out: torch.Tensor | None = None) -> torch.Tensor:
        """Full or sliding-window attention of the step's queries over the cache (K/V stored)."""
        out = torch.empty_like(q) if out is None else out
        window = dict(window=spec.sliding_window, dilation=spec.dilation, num_sinks=spec.num_sinks) \
            if spec.kind == "sliding" else {}
        if self.batch_invariant:
            return self._attend_rows(q, k_cache, v_cache, meta, scale, window, out)
        if self.use_decode_kernel(meta, q.shape[1], k_cache.shape[2]):
            paged_decode_attention(
                q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len, scale=scale,
                num_splits=self.decode_num_splits(meta, q, k_cache),
                unified_max=self.unified_max, out=out, **window,
            )
        else:
            paged_prefill_attention(
                q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                max_query_len=meta.max_query_len, scale=scale, out=out, **window,
            )
        return out

    def _attend_rows(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float, window: dict, out: torch.Tensor) -> torch.Tensor:
        """Batch-invariant attention: short sequences' tokens as one-token decode rows, longer prompt
        chunks through the prefill kernel (module docstring)."""
        decode_out = out
        if meta.max_query_len > INVARIANT_MAX_QUERY:  # some prompt chunk needs the prefill kernel
            paged_prefill_attention(
                q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                max_query_len=meta.max_query_len, scale=scale, out=out, **window,
            )
            decode_out = torch.empty_like(q)
        if meta.is_decode:  # one token per sequence: the sequences are the rows
            qsl, lens, tables, short = meta.query_start_loc, meta.seq_lens, meta.block_tables, None
        else:
            qsl, lens, tables, short = token_rows(meta)
        paged_decode_attention(
            q, k_cache, v_cache, qsl, lens, tables, max_query_len=1, max_seq_len=self.max_seq_len_cap,
            scale=scale, num_splits=self.decode_num_splits(meta, q, k_cache), unified_max=self.unified_max,
            out=decode_out, **window,
        )
        if decode_out is not out:
            torch.where(short[:, None, None], decode_out, out, out=out)
        return out

    def _quest(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float, spec: AttentionSpec, out: torch.Tensor) -> torch.Tensor:
        """Quest: a decode step reads the pages selected per (sequence, KV head); prompts attend
        densely (as in the paper). Both record their keys in the pages' bounds."""
        state = self.side_states.get(k_cache)
        if not meta.is_decode:
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            state.update(spec, k, meta.slot_mapping)
            return self._attend(q, k_cache, v_cache, meta, scale, spec, out)
        # each decode token owns its page, so the bounds update rides on the store; on CUDA the store
        # runs inside the selection's launch (its own page is always read, so its score is unused)
        bounds = state.quest_bounds(k.dtype)
        selects = self.use_decode_kernel(meta, q.shape[1], k_cache.shape[2])
        store = store_kv_args(k, v, k_cache, v_cache, meta.slot_mapping, bounds) if selects and q.is_cuda else None
        if store is None:
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping, quest_bounds=bounds)
        if not selects:
            return self._attend(q, k_cache, v_cache, meta, scale, spec, out)
        bs = k_cache.shape[1]
        max_pages = quest_num_pages(spec, -(-self.seq_bound(meta) // bs), bs)
        tables, virtual_lens = quest_block_tables(spec, q, meta.block_tables, meta.seq_lens, state, max_pages, store)
        paged_decode_attention(
            q, k_cache, v_cache, meta.query_start_loc, virtual_lens, tables,
            max_query_len=1, max_seq_len=max_pages * bs, scale=scale,
            num_splits=self.num_splits or choose_num_splits(meta.num_seqs, k_cache.shape[2], max_pages * bs,
                                                             num_sms(q.device), decode_block_n(q.shape[2], q.dtype,
                                                                                               k_cache.dtype),
                                                             min_blocks_per_split=QUEST_MIN_BLOCKS_PER_SPLIT),
            unified_max=self.unified_max, out=out,
        )
        return out


def token_rows(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every new token of the step as its own one-token sequence, built on the device once per step
    (memoised in ``meta``): query starts ``[T + 1]`` (0, 1, ..., T), context lengths ``[T]`` (the
    token's position + 1; 1 for tokens of sequences with more than ``INVARIANT_MAX_QUERY`` new
    tokens and for padding, whose rows the caller discards), block tables ``[T, max_blocks]`` (its
    sequence's), and which tokens are such rows ``[T]`` bool."""
    if "token_rows" not in meta.memo:
        qsl, device = meta.query_start_loc, meta.query_start_loc.device
        num_tokens, num_seqs = meta.slot_mapping.shape[0], meta.seq_lens.shape[0]
        tok = torch.arange(num_tokens, dtype=qsl.dtype, device=device)
        seq = torch.searchsorted(qsl[1:], tok, right=True).clamp_(max=max(num_seqs - 1, 0))
        end, start = qsl[1:].index_select(0, seq), qsl[:-1].index_select(0, seq)
        short = (end - start <= INVARIANT_MAX_QUERY) & (tok < end)
        # other rows get a 1-token context (their sequence's first slot, or block 0's for padding): the
        # decode kernel reads its last block at seq_len - 1, so 0 would address block -1
        lens = torch.where(short, meta.seq_lens.index_select(0, seq) - (end - 1 - tok), 1).to(torch.int32)
        rows = torch.arange(num_tokens + 1, dtype=torch.int32, device=device)
        meta.memo["token_rows"] = (rows, lens, meta.block_tables.index_select(0, seq), short)
    return meta.memo["token_rows"]
