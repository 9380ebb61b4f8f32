"""Quest page selection, LSH buckets and H2O heavy hitters on the paged cache: the torch backend
against dense references written out position by position, and the Triton decode kernel over
Quest's per-head block tables against the torch backend (interpreter on CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_test_utils import PagedBatch

from flashserve.config import AttentionSpec
from flashserve.kernels.reference import gather_kv_ref
from flashserve.layers.attention import TorchAttentionBackend
from flashserve.layers.attention_metadata import AttentionMetadata
from flashserve.cache.window import h2o_kept
from flashserve.layers.sparse_attention import kept_tokens, lsh_buckets

CPU = torch.device("cpu")


def _dense_attention(q, k, v, scale, allowed):
    """q [Hq, D] one query, k/v [S, Hkv, D], allowed [Hkv, S] bool -> [Hq, D] (fp32)."""
    hq, hkv = q.shape[0], k.shape[1]
    g = hq // hkv
    out = torch.empty(hq, q.shape[1])
    for h in range(hq):
        kv = h // g
        s = (k[:, kv].float() @ q[h].float()) * scale
        s = s.masked_fill(~allowed[kv], float("-inf"))
        out[h] = s.softmax(0) @ v[:, kv].float()
    return out


def _dense_quest(spec, q, k, v, scale, block_size):
    """Quest for each new token of one sequence, written out: per KV head, page bounds from the
    keys, the pages with the highest bound (max over the group's heads) plus its own page."""
    L, S = q.shape[0], k.shape[0]
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    out = torch.empty(L, hq, q.shape[2])
    for i in range(L):
        p = S - L + i
        pages = p // block_size + 1
        want = min(pages, max(math.ceil(spec.kv_budget * pages), 1 + -(-spec.num_sinks // block_size)))
        allowed = torch.zeros(hkv, S, dtype=torch.bool)
        for kv in range(hkv):
            bounds = []
            for page in range(pages):
                keys = k[page * block_size : min((page + 1) * block_size, S), kv].float()
                lo, hi = keys.amin(0), keys.amax(0)
                ub = max(float(torch.maximum(q[i, kv * g + j] * lo, q[i, kv * g + j] * hi).sum()) for j in range(g))
                forced = page == pages - 1 or page * block_size < spec.num_sinks
                bounds.append(float("inf") if forced else ub)
            chosen = sorted(range(pages), key=lambda x: -bounds[x])[:want]
            for page in chosen:
                allowed[kv, page * block_size : min((page + 1) * block_size, p + 1)] = True
        out[i] = _dense_attention(q[i], k, v, scale, allowed)
    return out


@pytest.mark.parametrize("block_size", [2, 4])
@pytest.mark.parametrize("budget,sinks", [(0.2, 0), (0.5, 3)])
def test_torch_quest_matches_dense_reference(block_size, budget, sinks):
    spec = AttentionSpec("quest", kv_budget=budget, num_sinks=sinks)
    batch = PagedBatch([41, 30], [1, 7], 4, 2, 8, block_size, torch.float32, CPU, seed=block_size)
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    backend = TorchAttentionBackend()
    # the cached context's keys enter the page bounds as the steps that wrote them would have
    state = backend.side_states.get(k_cache)
    for b, (s, ql) in enumerate(zip(batch.seq_lens, batch.q_lens)):
        pos = torch.arange(s - ql)
        slots = batch.meta.block_tables[b].long()[pos // block_size] * block_size + pos % block_size
        state.update(spec, k_cache.flatten(0, 1)[slots], slots)
    out = backend.forward(batch.q, batch.k_new, batch.v_new, k_cache, v_cache, batch.meta, 0.3, spec)
    start = 0
    for b, (s, ql) in enumerate(zip(batch.seq_lens, batch.q_lens)):
        k = gather_kv_ref(k_cache, batch.meta.block_tables[b], s)
        v = gather_kv_ref(v_cache, batch.meta.block_tables[b], s)
        ref = _dense_quest(spec, batch.q[start : start + ql], k, v, 0.3, block_size)
        torch.testing.assert_close(out[start : start + ql], ref, atol=1e-5, rtol=1e-5)
        start += ql


@pytest.mark.parametrize("buckets,window,sinks", [(4, 1, 0), (8, 3, 2)])
def test_torch_lsh_matches_dense_reference(buckets, window, sinks):
    spec = AttentionSpec("lsh", sliding_window=window, num_sinks=sinks, num_buckets=buckets)
    batch = PagedBatch([33, 19], [1, 19], 4, 2, 8, 4, torch.float32, CPU, seed=buckets)
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    out = TorchAttentionBackend().forward(batch.q, batch.k_new, batch.v_new, k_cache, v_cache, batch.meta, 0.3, spec)
    start = 0
    hits = total = 0
    for b, (s, ql) in enumerate(zip(batch.seq_lens, batch.q_lens)):
        k = gather_kv_ref(k_cache, batch.meta.block_tables[b], s)
        v = gather_kv_ref(v_cache, batch.meta.block_tables[b], s)
        kb = lsh_buckets(k, spec)  # [S, Hkv]
        for i in range(ql):
            p = s - ql + i
            q = batch.q[start + i]
            qb = lsh_buckets(q, spec)  # [Hq]
            for h in range(q.shape[0]):
                kv = h // 2
                allowed = torch.tensor([k_ <= p and (k_ < sinks or p - k_ < window or int(kb[k_, kv]) == int(qb[h]))
                                        for k_ in range(s)])
                hits += int(allowed.sum())
                total += p + 1
                ref = _dense_attention(q[h : h + 1], k[:, kv : kv + 1], v[:, kv : kv + 1], 0.3, allowed[None])
                torch.testing.assert_close(out[start + i, h], ref[0], atol=1e-5, rtol=1e-5)
        start += ql
    assert hits < total  # the buckets do leave keys out


def _meta(starts, q_lens, tables, block_size):
    seq_lens = [s + q for s, q in zip(starts, q_lens)]
    slots, qsl = [], [0]
    for s, q, t in zip(starts, q_lens, tables):
        slots += [t[p // block_size] * block_size + p % block_size for p in range(s, s + q)]
        qsl.append(qsl[-1] + q)
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
        torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        torch.tensor(slots, dtype=torch.int64), max(q_lens), max(seq_lens), list(q_lens), seq_lens, block_size,
        is_decode=all(q == 1 for q in q_lens))


@pytest.mark.parametrize("budget,sinks", [(0.3, 2), (0.5, 0)])
def test_h2o_steps_match_a_dense_simulation(budget, sinks):
    """A prompt chunk then decode steps: outputs equal a dense H2O run (per KV head: attend to
    kept tokens, add each key's attention to its score, evict the lowest beyond the budget
    except sinks and the recent half), the kept count and the sinks hold at every step, and the
    backend holds exactly the kept keys, compacted into the last slots."""
    torch.manual_seed(0)
    spec = AttentionSpec("h2o", kv_budget=budget, num_sinks=sinks)
    hq, hkv, d, bs, total = 4, 2, 8, 4, 30
    q_all, k_all, v_all = torch.randn(total, hq, d), torch.randn(total, hkv, d), torch.randn(total, hkv, d)
    k_cache, v_cache = torch.zeros(12, bs, hkv, d), torch.zeros(12, bs, hkv, d)
    table = [7, 2, 9, 0, 5, 11, 3, 8]
    backend = TorchAttentionBackend()
    score = torch.zeros(total, hkv)
    alive = torch.zeros(total, hkv, dtype=torch.bool)
    steps = [(0, 12)] + [(p, 1) for p in range(12, total)]
    for start, n in steps:
        meta = _meta([start], [n], [table], bs)
        out = backend.forward(q_all[start : start + n], k_all[start : start + n], v_all[start : start + n],
                              k_cache, v_cache, meta, 0.35, spec)
        alive[start : start + n] = True
        end = start + n
        for i in range(n):
            p = start + i
            for h in range(hq):
                kv = h // 2
                allowed = alive[:end, kv] & (torch.arange(end) <= p)
                s = (k_all[:end, kv] @ q_all[p, h]) * 0.35
                prob = s.masked_fill(~allowed, float("-inf")).softmax(0)
                torch.testing.assert_close(out[i, h], prob @ v_all[:end, kv], atol=1e-5, rtol=1e-5)
                score[:end, kv] += prob
        keep = kept_tokens(spec, end)
        for kv in range(hkv):
            live = [j for j in range(end) if alive[j, kv]]
            excess = len(live) - keep
            free = [j for j in live if j >= sinks and j < end - keep // 2]
            for j in sorted(free, key=lambda j: float(score[j, kv]))[: max(excess, 0)]:
                alive[j, kv] = False
        assert alive[:sinks].all() and (alive[:end].sum(0) == h2o_kept(budget, sinks, end)).all()
        # each KV head's kept keys sit compacted, in order, at logical positions [end - kept, end)
        pos = torch.arange(end - h2o_kept(budget, sinks, end), end)
        slots = torch.tensor(table)[pos // bs] * bs + pos % bs
        for kv in range(hkv):
            assert torch.equal(k_cache.flatten(0, 1)[slots, kv], k_all[:end][alive[:end, kv], kv])


def test_quest_decode_kernel_matches_torch_backend(device):
    from flashserve.kernels.triton_backend import TritonAttentionBackend

    spec = AttentionSpec("quest", kv_budget=0.25, num_sinks=2)
    batch = PagedBatch([70, 9, 40], [1, 1, 1], 8, 2, 16, 4, torch.float32, device, seed=4)
    caches = [(batch.k_cache.clone(), batch.v_cache.clone()) for _ in range(2)]
    outs = []
    for backend, (kc, vc) in zip((TorchAttentionBackend(), TritonAttentionBackend(num_splits=2)), caches):
        state = backend.side_states.get(kc)
        for b, (s, ql) in enumerate(zip(batch.seq_lens, batch.q_lens)):
            pos = torch.arange(s - ql, device=device)
            slots = batch.meta.block_tables[b].long()[pos // 4] * 4 + pos % 4
            state.update(spec, kc.flatten(0, 1)[slots], slots)
        outs.append(backend.forward(batch.q, batch.k_new, batch.v_new, kc, vc, batch.meta, 0.25, spec))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-4)


def test_quest_page_score_kernel_matches_torch(device):
    from flashserve.kernels.quest import quest_page_scores
    from flashserve.layers.sparse_attention import page_bounds

    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, D, bs, P = 3, 8, 2, 32, 4, 37
    bounds = torch.randn(50, 2, Hkv, D, generator=g)
    bounds = torch.stack([bounds.amin(1), bounds.amax(1)], 1).to(device)  # lo <= hi
    q = torch.randn(B, Hq, D, generator=g).to(device)
    tables = torch.randint(0, 50, (B, P), generator=g, dtype=torch.int32).to(device)
    seq_lens = torch.tensor([145, 1, 60], dtype=torch.int32, device=device)
    out = quest_page_scores(q, bounds, tables, seq_lens, bs)
    sel = bounds[tables.long()].float()  # [B, P, 2, Hkv, D]
    ref = page_bounds(q.float().view(B, Hkv, 1, Hq // Hkv, D), sel[:, :, 0].transpose(1, 2),
                      sel[:, :, 1].transpose(1, 2)).amax(-2)[:, :, 0]
    pages = (seq_lens.long() + bs - 1) // bs
    valid = torch.arange(P, device=device)[None, :] < pages[:, None]
    torch.testing.assert_close(out[valid[:, None, :].expand_as(out)], ref[valid[:, None, :].expand_as(ref)],
                               atol=1e-4, rtol=1e-4)
    assert (out[~valid[:, None, :].expand_as(out)] == float("-inf")).all()


@pytest.mark.parametrize("budget,sinks", [(0.2, 0), (0.25, 2), (0.5, 9), (1.0, 0), (0.1, 4)])
def test_quest_select_kernel_matches_torch_selection(device, budget, sinks):
    """The one-launch top-page selection (radix search on the scores' bits, prefix-sum compaction)
    gives the torch path's per-head tables and virtual lengths, sinks longer than a sequence too."""
    from flashserve.kernels.quest import quest_select
    from flashserve.layers.sparse_attention import SideState, page_bounds, quest_block_tables, quest_num_pages

    g = torch.Generator().manual_seed(int(budget * 100) + sinks)
    B, Hq, Hkv, D, bs, P = 4, 8, 2, 16, 4, 40
    spec = AttentionSpec("quest", kv_budget=budget, num_sinks=sinks)
    state = SideState(torch.zeros(B * P, bs, Hkv, D))
    raw = torch.randn(B * P + 1, 2, Hkv, D, generator=g)
    state.bounds = torch.stack([raw.amin(1), raw.amax(1)], 1)
    q = torch.randn(B, Hq, D, generator=g)
    tables = torch.randperm(B * P, generator=g).view(B, P).to(torch.int32)  # distinct blocks: no ties
    seq_lens = torch.tensor([157, 1, 60, 9], dtype=torch.int32)
    max_pages = quest_num_pages(spec, 40, bs)
    ref_tables, ref_lens = quest_block_tables(spec, q, tables, seq_lens, state, max_pages)
    sel = state.bounds[tables.long()]
    scores = page_bounds(q.view(B, Hkv, 1, Hq // Hkv, D), sel[:, :, 0].transpose(1, 2),
                         sel[:, :, 1].transpose(1, 2)).amax(-2)[:, :, 0].contiguous()
    out_tables, out_lens = quest_select(scores.to(device), tables.to(device), seq_lens.to(device), bs, budget, sinks,
                                        max_pages)
    assert torch.equal(out_lens.cpu(), ref_lens)
    pages = (seq_lens.long() + bs - 1) // bs
    for b in range(B):
        want = int((ref_lens[b] - (seq_lens[b] - (pages[b] - 1) * bs)) // bs + 1)
        assert torch.equal(out_tables[b, :, :want].cpu(), ref_tables[b, :, :want]), b
        assert (out_tables[b, :, want - 1].cpu() == tables[b, pages[b] - 1]).all()  # the own page last
    # ties at the threshold: the earliest pages
    flat = torch.zeros(1, Hkv, P)
    t, n = quest_select(flat.to(device), tables[:1].to(device), torch.tensor([80], dtype=torch.int32, device=device),
                        bs, 0.25, 0, 8)
    assert t[0, :, :5].cpu().tolist() == [tables[0, [0, 1, 2, 3, 19]].tolist()] * Hkv and int(n[0]) == 5 * bs
    # scores one ulp apart, with the whole int32 key range spanned (-inf, +inf): the search must
    # narrow down to the exact key, not to a neighbourhood of it
    bits = torch.randperm(P - 2, generator=g).to(torch.int32) + 0x3F800000
    close = torch.cat([bits.view(torch.float32), torch.tensor([float("-inf"), float("inf")])])
    close = close[torch.randperm(P, generator=g)].expand(1, Hkv, P).contiguous()
    t, n = quest_select(close.to(device), tables[:1].to(device), torch.tensor([P * bs], dtype=torch.int32,
                        device=device), bs, 0.25, 0, 10)
    pages = sorted(set(close[0, 0, :-1].topk(9).indices.tolist()) | {P - 1})
    assert t[0, :, :10].cpu().tolist() == [tables[0, pages].tolist()] * Hkv and int(n[0]) == 10 * bs


def _select_written_out(scores, table, seq_len, bs, budget, sink_pages, max_pages):
    """One (sequence, KV head)'s chosen blocks: the own page and the sinks' pages, then the best
    other pages by score (ties: the earliest), all in position order."""
    pages = -(-seq_len // bs)
    want = min(max(math.ceil(budget * pages), 1 + sink_pages), pages, max_pages)
    forced = [p for p in range(pages) if p == pages - 1 or p < sink_pages]
    others = sorted((p for p in range(pages) if p not in forced), key=lambda p: (-scores[p], p))
    chosen = sorted(forced + others[:max(want - len(forced), 0)])[:max_pages]
    return [table[p] for p in chosen], want


@pytest.mark.parametrize("kind", ["narrow", "ties", "mixed", "few"])
def test_quest_select_kernel_matches_written_out_selection(device, kind):
    """The selection's radix search picks what sorting would: scores in a narrow positive range
    (most of the keys' bits shared), heavy ties (the threshold inside a tie), mixed signs and
    magnitudes with infinities, and rows with fewer pages than the sinks and the own page."""
    from flashserve.kernels.quest import quest_select

    g = torch.Generator().manual_seed(len(kind))
    B, Hkv, bs, P = 5, 3, 4, 300
    if kind == "narrow":  # one binade: only the mantissa differs
        scores = 1.0 + torch.rand(B, Hkv, P, generator=g)
    elif kind == "ties":  # a few distinct values: the threshold falls inside a tie
        scores = torch.randint(0, 4, (B, Hkv, P), generator=g).float() * 0.5
    elif kind == "mixed":
        scores = torch.randn(B, Hkv, P, generator=g) * 10.0 ** torch.randint(-3, 4, (B, Hkv, P), generator=g)
        scores.view(-1)[torch.randperm(B * Hkv * P, generator=g)[:20]] = float("inf")
        scores.view(-1)[torch.randperm(B * Hkv * P, generator=g)[:20]] = float("-inf")
    else:
        scores = torch.randn(B, Hkv, P, generator=g)
    tables = torch.randperm(B * P, generator=g).view(B, P).to(torch.int32)
    seq_lens = [P * bs, 1 + (P - 1) * bs, 5, 2 * bs, 777] if kind != "few" else [1, 4, 9, 12, 13]
    for budget, sinks in ((0.2, 0), (0.33, 6), (0.05, 2)):
        sink_pages = -(-sinks // bs)
        max_pages = P
        out, vlens = quest_select(scores.to(device), tables.to(device), torch.tensor(seq_lens, dtype=torch.int32).to(device),
                                  bs, budget, sinks, max_pages)
        for b, seq_len in enumerate(seq_lens):
            pages = -(-seq_len // bs)
            for h in range(Hkv):
                ref, want = _select_written_out(scores[b, h].tolist(), tables[b].tolist(), seq_len, bs, budget,
                                                sink_pages, max_pages)
                assert out[b, h, :want].cpu().tolist() == ref, (kind, budget, b, h)
            assert int(vlens[b]) == (want - 1) * bs + seq_len - (pages - 1) * bs


def test_store_kv_with_quest_bounds_matches_torch_update(device, dtype):
    """A decode step's store with the bounds folded in (one launch) writes the cache as a plain
    store does and the bounds as the torch path's scatter-reduce: pages that the step opens are
    reset to the new key, others widened, padded slots (-1) write nothing."""
    from flashserve.kernels.cache_ops import store_kv
    from flashserve.layers.sparse_attention import SideState

    g = torch.Generator().manual_seed(7)
    num_blocks, bs, Hkv, D = 12, 4, 2, 16
    spec = AttentionSpec("quest", kv_budget=0.5)
    state = SideState(torch.zeros(num_blocks, bs, Hkv, D))
    raw = torch.randn(num_blocks + 1, 2, Hkv, D, generator=g)
    state.bounds = torch.stack([raw.amin(1), raw.amax(1)], 1).to(dtype)
    slots = torch.tensor([5 * bs, 2 * bs + 3, -1, 9 * bs + 1, 0], dtype=torch.int64)  # opens, widens, padding
    k = torch.randn(len(slots), Hkv, D, generator=g).to(dtype)
    v = torch.randn(len(slots), Hkv, D, generator=g).to(dtype)
    caches = [torch.randn(num_blocks, bs, Hkv, D, generator=g).to(dtype).to(device) for _ in range(2)]
    plain = [c.clone() for c in caches]
    before = state.bounds.clone()
    bounds = state.bounds.clone().to(device)
    store_kv(k.to(device), v.to(device), *caches, slots.to(device), quest_bounds=bounds)
    store_kv(k.to(device), v.to(device), *plain, slots.to(device))
    state.update(spec, k, slots)
    assert torch.equal(caches[0], plain[0]) and torch.equal(caches[1], plain[1])
    assert torch.equal(bounds[:num_blocks].cpu(), state.bounds[:num_blocks])
    assert torch.equal(bounds[5, 0].cpu(), k[0]) and torch.equal(bounds[5, 1].cpu(), k[0])
    assert not torch.equal(bounds[2].cpu(), before[2]) and torch.equal(bounds[3].cpu(), before[3])  # widened, untouched


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8])
def test_quest_select_with_the_store_equals_store_then_select(device, cache_dtype):
    """The selection launch that also stores the step's K/V (one more program per sequence)
    writes the cache, its scales and the key bounds as ``store_kv`` does, and selects what the
    selection alone selects: the own page's score, read before the store, never matters."""
    from flashserve.kernels.cache_ops import store_kv, store_kv_args
    from flashserve.kernels.kv_quant import allocate_cache, kv_scales
    from flashserve.kernels.quest import quest_select

    g = torch.Generator().manual_seed(11)
    B, Hkv, D, bs, P = 3, 2, 16, 4, 24
    seq_lens = torch.tensor([93, 5, 16], dtype=torch.int32)  # row 0's token opens its page, row 2's widens its bounds
    pages = (seq_lens + bs - 1) // bs
    tables = torch.randperm(B * P, generator=g).view(B, P).to(torch.int32)
    slots = torch.tensor([int(tables[b, pages[b] - 1]) * bs + (int(seq_lens[b]) - 1) % bs for b in range(B)])
    slots[1] = -1  # a padded row stores nothing
    scores = torch.randn(B, Hkv, P, generator=g)
    k = torch.randn(B, Hkv, D, generator=g)
    v = torch.randn(B, Hkv, D, generator=g)

    def fresh():
        gen = torch.Generator().manual_seed(5)
        if cache_dtype == torch.int8:
            caches = list(allocate_cache(B * P, bs, Hkv, D, torch.int8, device))
            for c in caches:
                c.copy_(torch.randint(-127, 128, c.shape, generator=gen, dtype=torch.int8).to(device))
                kv_scales(c).copy_(torch.rand(kv_scales(c).shape, generator=gen).to(device))
        else:
            caches = [torch.randn(B * P, bs, Hkv, D, generator=gen).to(device) for _ in range(2)]
        bounds = torch.randn(B * P + 1, 2, Hkv, D, generator=gen).to(device)
        return caches, bounds

    args = (scores.to(device), tables.to(device), seq_lens.to(device), bs, 0.3, 4, P)
    (kc, vc), bounds = fresh()
    store_kv(k.to(device), v.to(device), kc, vc, slots.to(device), quest_bounds=bounds)
    ref_tables, ref_lens = quest_select(*args)
    (kc2, vc2), bounds2 = fresh()
    store = store_kv_args(k.to(device), v.to(device), kc2, vc2, slots.to(device), bounds2)
    out_tables, out_lens = quest_select(*args, store=store)
    assert torch.equal(out_lens, ref_lens) and torch.equal(out_tables, ref_tables)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc) and torch.equal(bounds2, bounds)
    if cache_dtype == torch.int8:
        assert torch.equal(kv_scales(kc2), kv_scales(kc)) and torch.equal(kv_scales(vc2), kv_scales(vc))
