"""KV memory that follows H2O eviction (flashserve.cache.window.EvictingBlockManager): the layers
compact each KV head's kept tokens into the sequence's last slots, the block manager releases the
blocks below them, so a long generation at a 20% budget holds a bounded number of blocks; the
tokens equal a reference H2O that keeps every token at its slot and masks the evicted ones."""

from __future__ import annotations

import math

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.cache.block_manager import BlockManager
from flashserve.cache.window import HOLE, EvictingBlockManager, h2o_kept
from flashserve.config import AttentionSpec
from flashserve.layers.attention import Attention, causal_mask, context_slots, masked_attention, store_kv
from flashserve.layers.attention_metadata import AttentionBackend
from flashserve.layers.sparse_attention import kept_tokens
from flashserve.runner.kv_cache import bytes_per_block
from test_engine import prompts

H2O = dict(attention="h2o", kv_budget=0.2, attention_sinks=2)


class MaskedH2O(AttentionBackend):
    """Reference H2O for one sequence: tokens stay at their slots, evicted ones are masked; per KV
    head the lowest accumulated scores beyond ``kept_tokens`` are evicted after each step, never
    the sinks nor the newest half of the budget."""

    name = "masked_h2o"
    attention_kinds = ("h2o",)

    def __init__(self) -> None:
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per layer: score, alive [pos, Hkv]

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, spec=None):
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        (S,), (L,) = meta.seq_lens_cpu, meta.query_lens_cpu
        hkv = k_cache.shape[2]
        score, alive = self.state.setdefault(k_cache.data_ptr(), (torch.zeros(1024, hkv), torch.zeros(1024, hkv, dtype=torch.bool)))
        score[S - L : S], alive[S - L : S] = 0.0, True
        slots = context_slots(meta.block_tables[0], S, k_cache.shape[1], k_cache.device)
        keys, values = k_cache.flatten(0, 1)[slots], v_cache.flatten(0, 1)[slots]
        g = q.shape[1] // hkv
        mask = (causal_mask(L, S, q.device)[None] & alive[:S].T[:, None, :]).repeat(1, g, 1)
        out, probs = masked_attention(q, keys, values, scale, mask)
        score[:S] += probs.sum(1).T
        keep = kept_tokens(spec, S)
        pos = torch.arange(S)
        protected = (pos < spec.num_sinks) | (pos >= S - keep // 2)
        for h in range(hkv):
            excess = int(alive[:S, h].sum()) - keep
            if excess > 0:
                key = score[:S, h].masked_fill(protected | ~alive[:S, h], float("inf"))
                victims = key.topk(excess, largest=False).indices
                alive[victims[key[victims].isfinite()], h] = False
        assert alive[: min(S, spec.num_sinks)].all()  # sinks are never evicted
        assert (alive[:S].sum(0) == h2o_kept(spec.kv_budget, spec.num_sinks, S)).all()
        return out


def _reference_greedy(llm: LLM, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of ``llm``'s model with every attention layer on MaskedH2O, prompt in one
    step then one token per step (the engine's steps), over a table that is never trimmed."""
    engine = llm.engine
    worker = engine.executor.worker
    layers = [m for m in worker.model.modules() if isinstance(m, Attention)]
    saved = [m.backend for m in layers]
    reference = MaskedH2O()
    for m in layers:
        m.backend = reference
    bm = BlockManager(engine.block_manager.num_blocks, engine.block_manager.block_size)
    table = bm.allocate_slots("ref", len(prompt) + n)
    try:
        tokens, chunk, start = [], list(prompt), 0
        for _ in range(n):
            nxt = int(worker.score_chunk(chunk, start, table)[-1].argmax())
            tokens.append(nxt)
            start, chunk = start + len(chunk), [nxt]
        return tokens
    finally:
        for m, b in zip(layers, saved):
            m.backend = b


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_h2o")
    make_tiny_checkpoint("llama3_gqa", folder, seed=3)
    return str(folder)


def _engine(folder, **kw) -> LLM:
    kw.setdefault("kv_cache_bytes", 8 << 20)
    kw.setdefault("max_model_len", 256)
    return LLM(model=folder, device="cpu", block_size=4, verbose=False, **H2O, **kw)


def test_h2o_kept_count_does_not_depend_on_the_steps():
    """The host's count equals a step-by-step simulation of the eviction for any step sizes."""
    for budget, sinks in [(0.2, 2), (0.1, 4), (0.5, 0), (1.0, 1), (0.05, 8)]:
        for steps in ([1] * 200, [37] + [1] * 100, [5, 64, 3, 100], [200]):
            alive = seq = 0
            for n in steps:
                seq, alive = seq + n, alive + n
                keep = max(math.ceil(budget * seq), sinks + 1)
                protected = min(seq, sinks + keep // 2)
                if alive > keep:
                    alive = max(keep, protected)
                assert alive == h2o_kept(budget, sinks, seq), (budget, sinks, steps, seq)


def test_evicting_manager_releases_below_the_kept_tokens_and_never_shares():
    bm = EvictingBlockManager(64, 4, True, 8, kv_budget=0.2, sinks=2)
    table = list(bm.allocate_slots("a", 101))
    bm.trim("a", 100)  # 20 kept tokens at positions [80, 100): blocks 0-19 are released
    assert bm.block_table("a")[:20] == [HOLE] * 20 and bm.block_table("a")[20:] == table[20:]
    assert bm.blocks_held("a") == 6 and not bm.can_swap_out("a")
    assert bm.lookup_prefix("b", list(range(40))).num_tokens == 0
    with pytest.raises(ValueError, match="cannot be shared with a forked sequence"):
        bm.fork("a", "c", 100, False)
    bm.free("a")
    assert bm.num_used_blocks == 0
    bm.check_invariants()


def test_h2o_generation_holds_bounded_blocks_and_matches_the_masked_reference(tiny):
    llm = _engine(tiny)
    engine = llm.engine
    assert isinstance(engine.block_manager, EvictingBlockManager)
    prompt = prompts(1, seed=4, lo=12, hi=12)[0]
    n = 80
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    out, held = None, []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
        if engine.has_unfinished_requests():
            held.append(engine.block_manager.blocks_held("r"))
    tokens = out.outputs[0].token_ids
    assert tokens == _reference_greedy(llm, prompt, n)
    # 92 tokens at 20%: 19 kept tokens (5 blocks of 4) + the next token's block + a partial one
    bound = -(-h2o_kept(0.2, 2, len(prompt) + n) // 4) + 2
    assert max(held) <= bound <= -(-(len(prompt) + n) // 4) // 3  # a third of what full attention holds
    assert engine.block_manager.num_used_blocks == 0
    # the same requests batched together give each one's tokens alone (prompts in one step each:
    # H2O evicts after every step, so a chunked prompt keeps other tokens)
    llm = _engine(tiny, max_num_batched_tokens=256)
    batch = prompts(3, seed=6, lo=9, hi=30)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    together = [o.token_ids for o in llm.generate(batch, params, use_tqdm=False)]
    assert together == [llm.generate([p], params, use_tqdm=False)[0].token_ids for p in batch]
    assert together[1] == _reference_greedy(llm, batch[1], 24)


def test_h2o_preemption_recomputes_and_prefix_caching_is_off(tiny):
    batch = prompts(10, seed=8, lo=5, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    roomy = _engine(tiny, max_num_batched_tokens=64).generate(batch, params, use_tqdm=False)  # the tight run's budget
    assert all(o.num_cached_tokens == 0 for o in roomy)
    per_block = bytes_per_block(_engine(tiny).engine.model_config, 4, torch.float32)
    tight = _engine(tiny, kv_cache_bytes=24 * per_block, max_model_len=80, preemption_mode="swap",
                    swap_space_bytes=256 * per_block, max_num_batched_tokens=64)
    outs = tight.generate(batch, params, use_tqdm=False)
    sched = tight.engine.scheduler
    assert sched.num_preemptions > 0 and sched.num_swap_outs == 0  # H2O scores do not travel: recompute
    assert all(len(o.token_ids) == 30 for o in outs)
    # requests never preempted and never chunked see the same steps, hence the same evictions
    assert sum(a.token_ids == b.token_ids for a, b in zip(outs, roomy)) >= len(batch) // 2
    assert tight.engine.block_manager.num_used_blocks == 0
    tight.engine.block_manager.check_invariants()


def test_grouped_layout_releases_h2o_groups_below_their_kept_tokens():
    """Gemma-3-like local/global layers with --attention h2o: the local groups release out of their
    window, the H2O group below its kept tokens; no prefix sharing, no swap."""
    from flashserve.cache.kv_groups import GroupedBlockManager, kv_layout
    from flashserve.config import LayerSpec, ModelConfig

    local = LayerSpec(AttentionSpec("sliding", 8, rope_theta=1e4), "gated_gelu_tanh")
    glob = LayerSpec(AttentionSpec(), "gated_gelu_tanh")
    mc = ModelConfig("gemma3", 10, 8, 16, 6, 1, 1, 8, 64, hidden_act="gelu_pytorch_tanh",
                     layer_types=tuple(local if i % 6 < 5 else glob for i in range(6)))
    layout = kv_layout(mc.with_attention(AttentionSpec("h2o", kv_budget=0.2, num_sinks=2)))
    assert [g.kv_budget for g in layout.groups] == [None] * 5 + [0.2] and layout.groups[5].sinks == 2
    bm = GroupedBlockManager(256, 4, True, 16, layout)
    assert bm.allocate_slots("a", 101) is not None
    bm.trim("a", 100)  # window 8: positions >= 93; H2O: 20 kept tokens at [80, 100)
    tables = bm.block_tables("a")
    assert all(t[:23] == [HOLE] * 23 and HOLE not in t[23:] for t in tables[:5])
    assert tables[5][:20] == [HOLE] * 20 and HOLE not in tables[5][20:]
    assert not bm.can_swap_out("a") and bm.lookup_prefix("b", list(range(3, 60))).num_tokens == 0
    bm.check_invariants()
    bm.free("a")
    assert bm.num_used_blocks == 0


def test_h2o_with_speculative_decoding_is_a_clear_error():
    with pytest.raises(ValueError, match="use speculative decoding or h2o, not both"):
        LLM(model="unused", speculative_config={"method": "ngram", "num_speculative_tokens": 2}, **H2O)
