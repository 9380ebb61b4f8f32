"""Approximate attention kinds on the paged cache: H2O heavy hitters, Quest page selection and
LSH buckets (``AttentionSpec``); sliding windows live in the kernels' masks
(``flashserve.kernels.reference.window_mask``).

Per layer, a kind may keep *side state* beside the KV cache, indexed by the same flat slots:

* quest: per block and KV head, the elementwise minimum and maximum of its keys
  ``[num_blocks, 2, Hkv, D]`` in the keys' dtype (1/block_size of the KV bytes), updated on store. A query's upper bound on ``q . k`` over a
  page is ``sum_d max(q_d min_d, q_d max_d)``; the pages with the highest bounds are read.
* h2o: per slot and KV head, the attention the token has received so far (``score``, fp32).
  The kept tokens of each KV head are compacted, in position order, into the last slots of the
  sequence's logical table (``flashserve.cache.window``): with S tokens, logical positions
  ``[S - h2o_kept(S), S)`` hold them, so a step reads that region plus its new tokens, causally,
  and the block manager releases the blocks below it. After each step the lowest-scoring tokens
  beyond the budget are evicted per KV head (never the sinks, which stay the region's first
  entries, nor the recent half of the budget) and the survivors are moved down (K, V and score).
* lsh: nothing stored; keys and queries are hashed on the fly with one fixed random rotation
  per layer (angular LSH: bucket = argmax over [x R, -x R]).

``visible_keys`` gives, for one sequence's queries and context, the ``[Hkv, G * L, S]`` mask of
the keys each query row (head g of a KV group, new token l) attends to (quest, lsh); the torch
backend applies it densely, and ``quest_block_tables`` gives the Triton kernels the pages to read.
"""

from __future__ import annotations

import math

import torch

from flashserve.cache.window import h2o_kept
from flashserve.config import AttentionSpec
from flashserve.kernels import kv_quant


class SideState:
    """Side tensors of one layer's cache, allocated on first use (see module docstring)."""

    def __init__(self, k_cache: torch.Tensor) -> None:
        self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim = k_cache.shape
        self.device = k_cache.device
        self.bounds: torch.Tensor | None = None  # quest: [num_blocks + 1, 2, Hkv, D], the keys' dtype
        self.score: torch.Tensor | None = None  # h2o: [num_blocks * block_size, Hkv] fp32

    def quest_bounds(self, dtype: torch.dtype) -> torch.Tensor:
        """Quest's page bounds, allocated on first use; one extra row takes the writes of skipped
        slots (-1). Decode steps on the GPU fold their keys in as they store them
        (``flashserve.kernels.cache_ops.store_kv``); ``update`` is the general path."""
        if self.bounds is None:
            self.bounds = torch.zeros(self.num_blocks + 1, 2, self.num_kv_heads, self.head_dim,
                                      dtype=dtype, device=self.device)
        return self.bounds

    def update(self, spec: AttentionSpec, k: torch.Tensor, slots: torch.Tensor) -> None:
        """Record the new keys k [T, Hkv, D] stored at flat ``slots`` [T] (-1: skipped)."""
        if spec.kind == "quest":
            self.quest_bounds(k.dtype)
            blocks = torch.div(slots, self.block_size, rounding_mode="floor")  # -1 for skipped slots
            # a block's first token resets its bounds (no host sync: the others write the spare row)
            reset = torch.where(slots % self.block_size == 0, blocks, self.num_blocks)
            self.bounds[reset, 0] = k
            self.bounds[reset, 1] = k
            rows = (blocks % (self.num_blocks + 1))[:, None, None].expand_as(k)  # [T, Hkv, D]
            self.bounds[:, 0].scatter_reduce_(0, rows, k, "amin", include_self=True)
            self.bounds[:, 1].scatter_reduce_(0, rows, k, "amax", include_self=True)
        elif spec.kind == "h2o":
            if self.score is None:
                n = self.num_blocks * self.block_size
                self.score = torch.zeros(n, self.num_kv_heads, dtype=torch.float32, device=self.device)
            self.score[slots] = 0.0


class SideStates:
    """The side state of every layer of a backend, keyed by the layer's cache tensor."""

    def __init__(self) -> None:
        self._states: dict[tuple, SideState] = {}

    def get(self, k_cache: torch.Tensor) -> SideState:
        key = (k_cache.data_ptr(), tuple(k_cache.shape))
        if key not in self._states:
            self._states[key] = SideState(k_cache)
        return self._states[key]


def kept_tokens(spec: AttentionSpec, seq_len: int) -> int:
    """h2o: tokens kept per KV head once a sequence has ``seq_len`` tokens."""
    return min(seq_len, max(math.ceil(spec.kv_budget * seq_len), spec.num_sinks + 1))


def quest_num_pages(spec: AttentionSpec, num_pages: int, block_size: int) -> int:
    """quest: pages a query reads out of the ``num_pages`` its context spans (always its own
    page and the sinks' pages)."""
    sink_pages = -(-spec.num_sinks // block_size)
    return min(num_pages, max(math.ceil(spec.kv_budget * num_pages), 1 + sink_pages))


def page_bounds(
    q: torch.Tensor,  # [..., L, G, D] fp32
    lo: torch.Tensor,  # [..., pages, D] fp32 per-page key minima
    hi: torch.Tensor,  # [..., pages, D] maxima
) -> torch.Tensor:  # [..., L, G, pages]
    """Quest's upper bound of q . k over each page: sum_d max(q_d lo_d, q_d hi_d)
    = relu(q) . hi - relu(-q) . lo (two matmuls)."""
    lead = q.shape[:-3]
    L, G, D = q.shape[-3:]
    flat = q.reshape(*lead, L * G, D)
    bound = flat.clamp(min=0) @ hi.transpose(-1, -2) + flat.clamp(max=0) @ lo.transpose(-1, -2)
    return bound.reshape(*lead, L, G, lo.shape[-2])


def _lsh_rotation(spec: AttentionSpec, head_dim: int, device: torch.device) -> torch.Tensor:
    """The fixed random rotation [D, num_buckets / 2] of a layer (seeded by its parameters)."""
    g = torch.Generator().manual_seed(1000 + spec.num_buckets)
    return torch.randn(head_dim, spec.num_buckets // 2, generator=g).to(device)


def lsh_buckets(x: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """Angular LSH bucket of each vector x [..., D] -> [...] int64."""
    proj = x.float() @ _lsh_rotation(spec, x.shape[-1], x.device)
    return torch.cat([proj, -proj], dim=-1).argmax(dim=-1)


def visible_keys(
    spec: AttentionSpec,
    q: torch.Tensor,  # [L, Hq, D] the sequence's new queries
    keys: torch.Tensor,  # [S, Hkv, D] its whole context (positions 0 .. S-1)
    slots: torch.Tensor,  # [S] flat cache slots of the context
    state: SideState | None,
    scale: float,
) -> torch.Tensor:  # [Hkv, G * L, S] bool, rows g * L + l
    """Which keys each query row attends to, for the quest / lsh kinds (causal included)."""
    L, Hq, _ = q.shape
    S, Hkv = keys.shape[0], keys.shape[1]
    G = Hq // Hkv
    q_pos = torch.arange(S - L, S, device=q.device)
    k_pos = torch.arange(S, device=q.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [L, S]
    sinks = (k_pos < spec.num_sinks)[None, :]
    qg = q.view(L, Hkv, G, -1)
    if spec.kind == "lsh":
        kb = lsh_buckets(keys, spec).T  # [Hkv, S]
        qb = lsh_buckets(qg, spec).permute(1, 2, 0)  # [Hkv, G, L]
        local = (q_pos[:, None] - k_pos[None, :]) < (spec.sliding_window or 1)  # [L, S]
        same = qb[..., None] == kb[:, None, None, :]  # [Hkv, G, L, S]
        mask = causal & (same | local | sinks)
        return mask.reshape(Hkv, G * L, S)
    if spec.kind == "quest":
        bs = state.block_size
        pages = -(-S // bs)
        blocks = slots[::bs] // bs  # [pages] physical block of each page
        lo, hi = state.bounds[blocks, 0].float(), state.bounds[blocks, 1].float()  # [pages, Hkv, D]
        # upper bound of q.k over each page, max over the group's heads: [L, Hkv, pages]
        bound = page_bounds(qg.float().transpose(0, 1), lo.transpose(0, 1), hi.transpose(0, 1))  # [Hkv, L, G, pages]
        bound = bound.amax(2).transpose(0, 1)
        page_of_q = q_pos // bs  # [L]
        page_ids = torch.arange(pages, device=q.device)
        reachable = page_ids[None, :] <= page_of_q[:, None]  # [L, pages]
        forced = (page_ids[None, :] == page_of_q[:, None]) | (page_ids[None, :] * bs < spec.num_sinks)
        bound = bound.masked_fill(~reachable[:, None, :], float("-inf"))
        bound = bound.masked_fill(forced[:, None, :], float("inf"))
        want = torch.tensor([quest_num_pages(spec, int(p) + 1, bs) for p in page_of_q.tolist()], device=q.device)
        rank = bound.argsort(dim=-1, descending=True).argsort(dim=-1)  # [L, Hkv, pages]
        chosen = rank < want[:, None, None]
        token_chosen = chosen.repeat_interleave(bs, dim=-1)[..., :S]  # [L, Hkv, S]
        mask = causal[:, None, :] & token_chosen  # [L, Hkv, S]
        return mask.permute(1, 0, 2).repeat(1, G, 1)
    raise ValueError(f"visible_keys does not handle {spec.kind!r} attention")


def h2o_region_start(spec: AttentionSpec, seq_len: int, query_len: int) -> int:
    """h2o: the first logical position a step reads: its kept tokens sit at ``[lo, start)``."""
    start = seq_len - query_len
    return start - h2o_kept(spec.kv_budget, spec.num_sinks, start)


def h2o_evict_and_compact(
    spec: AttentionSpec,
    probs: torch.Tensor,  # [Hkv, G * L, R] attention probabilities of this step's rows over its region
    slots: torch.Tensor,  # [R] flat cache slots of the region (kept tokens, then the new ones)
    seq_len: int,  # the sequence's tokens after this step
    state: SideState,
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] (8-bit caches too)
    v_cache: torch.Tensor,
) -> None:
    """Add the attention each key received to its score, evict per KV head the lowest-scoring
    tokens beyond ``h2o_kept`` (never the sinks, the region's first entries, nor the newest
    ``budget // 2``), and move each head's survivors, in order, into the region's last slots
    (K, V and score), so that logical positions ``[seq_len - kept, seq_len)`` hold them."""
    R, Hkv = slots.shape[0], k_cache.shape[2]
    score = state.score[slots] + probs.sum(1).T  # [R, Hkv]
    kept = h2o_kept(spec.kv_budget, spec.num_sinks, seq_len)
    if kept >= R:  # nothing to evict: the region already ends at seq_len
        state.score[slots] = score
        return
    budget = max(math.ceil(spec.kv_budget * seq_len), spec.num_sinks + 1)
    idx = torch.arange(R, device=slots.device)
    protected = (idx < spec.num_sinks) | (idx >= R - budget // 2)  # h2o_kept leaves enough unprotected
    victims = score.masked_fill(protected[:, None], float("inf")).topk(R - kept, dim=0, largest=False).indices
    evicted = torch.zeros(R, Hkv, dtype=torch.int8, device=slots.device).scatter_(0, victims, 1)
    order = evicted.sort(dim=0, stable=True).indices[:kept]  # [kept, Hkv] survivors in position order
    dest = slots[R - kept :]
    state.score[dest] = score.gather(0, order)
    rows = order[..., None].expand(kept, Hkv, k_cache.shape[3])
    if kv_quant.is_quantized(k_cache):  # dequantize, move, quantize again (not tested: h2o with an 8-bit KV)
        k = kv_quant.gather(k_cache, slots, torch.float32).gather(0, rows)
        v = kv_quant.gather(v_cache, slots, torch.float32).gather(0, rows)
        kv_quant.store(k, v, k_cache, v_cache, dest)
        return
    for cache in (k_cache, v_cache):
        flat = cache.view(-1, Hkv, cache.shape[3])
        flat[dest] = flat[slots].gather(0, rows)


def quest_block_tables(
    spec: AttentionSpec,
    q: torch.Tensor,  # [B, Hq, D] one new token per sequence (a decode step)
    block_tables: torch.Tensor,  # [B, P] int32
    seq_lens: torch.Tensor,  # [B] int32
    state: SideState,
    max_pages: int,  # host bound on the pages any query reads (sizes the output)
    store=None,  # CUDA: the step's K/V store (``cache_ops.StoreArgs``), run inside the selection's launch
) -> tuple[torch.Tensor, torch.Tensor]:  # [B, Hkv, max_pages] int32, [B] int32
    """A decode step's Quest selection as block tables per (sequence, KV head): the chosen
    pages' blocks in position order, the query's own page last, so that the kernels run plain
    causal attention over a virtual context of ``virtual_lens`` tokens. Device ops only."""
    B, Hq, D = q.shape
    Hkv, bs = state.num_kv_heads, state.block_size
    G = Hq // Hkv
    P = block_tables.shape[1]
    if q.is_cuda:  # two launches: page scores, then the exact top pages (flashserve.kernels.quest)
        from flashserve.kernels.quest import quest_page_scores, quest_select

        bound = quest_page_scores(q, state.bounds, block_tables, seq_lens, bs)  # [B, Hkv, P]
        return quest_select(bound, block_tables, seq_lens, bs, spec.kv_budget, spec.num_sinks, min(max_pages, P),
                            store)
    assert store is None, "the torch path stores the step's K/V before it selects"
    # the torch reference of those two kernels (ties: topk's order instead of the earliest pages)
    num_pages = (seq_lens.long() + bs - 1) // bs  # [B]
    bounds = state.bounds[block_tables.long()].float()  # [B, P, 2, Hkv, D]
    lo, hi = bounds[:, :, 0].transpose(1, 2), bounds[:, :, 1].transpose(1, 2)  # [B, Hkv, P, D]
    bound = page_bounds(q.float().view(B, Hkv, 1, G, D), lo, hi).amax(-2)[:, :, 0]
    page_ids = torch.arange(P, device=q.device)
    sink_pages = -(-spec.num_sinks // bs)
    inside = page_ids[None, :] < num_pages[:, None]  # [B, P]
    forced = ((page_ids[None, :] == num_pages[:, None] - 1) | (page_ids[None, :] < sink_pages)) & inside
    bound = bound.masked_fill(~inside[:, None, :], float("-inf"))
    bound = bound.masked_fill(forced[:, None, :], float("inf"))
    want = torch.clamp(torch.ceil(spec.kv_budget * num_pages.double()).long(), min=1 + sink_pages)
    want = torch.minimum(want, num_pages)  # [B] pages read by each sequence's query
    k = min(max_pages, P)
    top = bound.topk(k, dim=-1).indices  # [B, Hkv, k], best first
    rank = torch.arange(k, device=q.device)
    order_key = torch.where(rank[None, None, :] < want[:, None, None], top, P + rank[None, None, :])
    pages = order_key.sort(dim=-1).values.clamp(max=P - 1)  # chosen pages ascending, then padding
    tables = block_tables.long()[:, None, :].expand(B, Hkv, P).gather(2, pages).to(torch.int32)
    virtual_lens = ((want - 1) * bs + seq_lens.long() - (num_pages - 1) * bs).to(torch.int32)
    return tables.contiguous(), virtual_lens
