"""KV memory that follows the window (flashserve.cache.window) and the engine's attention options.

A windowed model holds a bounded number of blocks however long it generates; prefix caching,
swap and recompute preemption still give the tokens of an unconstrained run; sinks are never
released; bad options are clear errors."""

from __future__ import annotations

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.cache.kv_groups import kv_layout
from flashserve.cache.window import HOLE, WindowedBlockManager
from flashserve.config import AttentionSpec, LayerSpec
from flashserve.runner.kv_cache import bytes_per_block
from test_engine import hf_greedy, prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)


def test_trim_releases_blocks_below_the_window_but_not_the_sinks():
    bm = WindowedBlockManager(16, 4, sinks=2, span=8)
    table = list(bm.allocate_slots("a", 20))
    bm.trim("a", 20)  # the query at 20 sees [13, 20] and the sinks 0, 1
    assert bm.block_table("a") == [table[0], HOLE, HOLE, table[3], table[4]]
    assert bm.num_used_blocks == 3 and bm.blocks_held("a") == 3
    bm.check_invariants()
    bm.host = type(bm.host)(8)
    pairs = bm.swap_out("a")
    assert [d for d, _ in pairs] == [table[0], table[3], table[4]] and bm.num_used_blocks == 0
    back = bm.swap_in("a")
    assert len(back) == 3 and bm.block_table("a")[1:3] == [HOLE, HOLE]
    bm.check_invariants()
    bm.free("a")
    assert bm.num_used_blocks == 0
    bm.check_invariants()


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral_swa")
    return str(folder), make_tiny_checkpoint("mistral_swa", folder, seed=4)


def _engine(folder, **kw) -> LLM:
    kw.setdefault("kv_cache_bytes", 8 << 20)
    kw.setdefault("max_model_len", 256)
    return LLM(model=folder, device="cpu", block_size=4, verbose=False, **kw)


def test_windowed_model_holds_bounded_blocks_over_a_long_generation(mistral):
    folder, hf = mistral
    llm = _engine(folder)
    engine = llm.engine
    assert kv_layout(engine.model_config).groups[0].span == 8
    prompt = prompts(1, seed=1, lo=12, hi=12)[0]
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=36, ignore_eos=True))
    held, out = [], None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
        held.append(engine.block_manager.num_used_blocks)
    assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 36)  # 48 tokens: 6 windows of 8
    # the window (8 tokens) spans at most 3 blocks of 4, plus the block the next token goes to
    assert max(held[2:]) <= 4 and engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_windowed_preemption_gives_the_unconstrained_tokens(mistral, mode):
    folder, _ = mistral
    batch = prompts(12, seed=5, lo=5, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    roomy = _engine(folder).generate(batch, params, use_tqdm=False)
    per_block = bytes_per_block(_engine(folder).engine.model_config, 4, torch.float32)
    # 20 blocks of 4 tokens: a window needs 3-4 of them per request, 12 requests do not fit
    tight_llm = _engine(folder, kv_cache_bytes=20 * per_block, max_model_len=64, preemption_mode=mode,
                        swap_space_bytes=256 * per_block if mode == "swap" else 0, max_num_batched_tokens=64)
    tight = tight_llm.generate(batch, params, use_tqdm=False)
    assert tight_llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    assert tight_llm.engine.block_manager.num_used_blocks == 0
    tight_llm.engine.block_manager.check_invariants()


def test_windowed_prefix_cache_reuses_blocks_and_keeps_tokens(mistral):
    folder, hf = mistral
    llm = _engine(folder)
    prompt = prompts(1, seed=9, lo=30, hi=30)[0]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    second = llm.engine
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and again.token_ids == first.token_ids == hf_greedy(hf, prompt, 20)
    second.block_manager.check_invariants()


def test_engine_attention_option_windows_a_full_attention_model(tmp_path):
    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=2)
    llm = _engine(str(tmp_path), attention="sinks", attention_window=8, attention_sinks=2)
    mc = llm.engine.model_config
    assert mc.layer_spec(0).attention == AttentionSpec("sliding", 8, num_sinks=2)
    assert isinstance(llm.engine.block_manager, WindowedBlockManager)
    batch = prompts(4, seed=3, lo=20, hi=40)
    outs = llm.generate(batch, GREEDY, use_tqdm=False)
    alone = llm.generate([batch[2]], GREEDY, use_tqdm=False)[0]
    assert alone.token_ids == outs[2].token_ids
    # the window changes the tokens of a model trained with full attention
    full = _engine(str(tmp_path)).generate(batch, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in full] != [o.token_ids for o in outs]


@pytest.mark.parametrize("kw,message", [
    (dict(attention="sliding", attention_window=0), "window must be >= 1"),
    (dict(attention="sliding"), "needs attention_window"),
    (dict(attention="h2o", kv_budget=0.0), r"KV budget in \(0, 1\]"),
    (dict(attention="quest", kv_budget=1.5), r"KV budget in \(0, 1\]"),
    (dict(attention="sinks", attention_window=16, attention_sinks=0), "attention_sinks >= 1"),
    (dict(attention="lsh", lsh_buckets=3), "even number of buckets"),
    (dict(kv_budget=0.2), "need an attention kind"),
    (dict(attention="sliding", attention_window=8, attention_dilation=0), "dilation must be >= 1"),
])
def test_bad_attention_options_are_clear_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        LLM(model="unused", **kw)


def test_with_attention_keeps_the_models_own_windows():
    from flashserve.config import ModelConfig

    local = LayerSpec(AttentionSpec("sliding", 512, rope_theta=1e4), "gated_gelu_tanh")
    glob = LayerSpec(AttentionSpec(), "gated_gelu_tanh")
    mc = ModelConfig("gemma3", 10, 8, 16, 2, 1, 1, 8, 64, hidden_act="gelu_pytorch_tanh", layer_types=(local, glob))
    out = mc.with_attention(AttentionSpec("h2o", kv_budget=0.2, num_sinks=4))
    assert out.layer_spec(0) == local and out.layer_spec(1).attention.kind == "h2o"
    assert out.layer_spec(1).mlp == "gated_gelu_tanh" and kv_layout(out).num_groups == 2


def _gemma_like(num_layers: int = 18, window: int = 8):
    from flashserve.config import ModelConfig

    local = LayerSpec(AttentionSpec("sliding", window, rope_theta=1e4), "gated_gelu_tanh")
    glob = LayerSpec(AttentionSpec(), "gated_gelu_tanh")
    return ModelConfig("gemma3", 10, 8, 16, num_layers, 1, 1, 8, 64, hidden_act="gelu_pytorch_tanh",
                       layer_types=tuple(local if i % 6 < 5 else glob for i in range(num_layers)))


def test_layout_groups_layers_by_memory_kind():
    layout = kv_layout(_gemma_like())
    assert layout.slab == 3 and layout.num_groups == 6  # 15 local layers in 5 groups of 3, the 3 global ones
    assert [g.span for g in layout.groups] == [8] * 5 + [None]
    assert layout.layer_group[5] == layout.layer_group[11] == layout.layer_group[17] == 5
    assert sorted(zip(layout.layer_group, layout.layer_slab)) == sorted({(g, r) for g in range(6) for r in range(3)})
    uneven = kv_layout(_gemma_like(8))  # 7 local, 1 global: slab 1, every layer its own group
    assert uneven.slab == 1 and uneven.num_groups == 8


def test_grouped_manager_releases_windowed_groups_only():
    from flashserve.cache.kv_groups import GroupedBlockManager

    layout = kv_layout(_gemma_like(12, window=8))  # 10 local, 2 global: slab 2, 6 groups
    bm = GroupedBlockManager(64, 4, True, 16, layout)
    assert bm.allocate_slots("a", 24) is not None and bm.num_used_blocks == 6 * 6
    bm.trim("a", 24)  # the query at 24 sees [17, 24]: positions 0-15 (blocks 0-3) are out of every window
    tables = bm.block_tables("a")
    assert all(t[:4] == [HOLE] * 4 and HOLE not in t[4:] for t in tables[:5]) and HOLE not in tables[5]
    assert bm.num_used_blocks == 5 * 2 + 6 and bm.blocks_held("a") == 16
    # what a plan sends of the tables a Worker holds the first 3 columns of: every group's tail
    assert bm.table_tail("a", 3) == (tuple(tables[0][3:]), tuple(tuple(t[3:]) for t in tables[1:]), 6)
    assert bm.table_tail("a", 6) == ((), ((),) * 5, 6)
    bm.check_invariants()
    pairs = bm.swap_out("a")
    assert len(pairs) == 16 and bm.num_used_blocks == 0
    assert len(bm.swap_in("a")) == 16 and bm.block_tables("a")[0][:4] == [HOLE] * 4
    bm.free("a")
    assert bm.num_used_blocks == 0
    bm.check_invariants()


def test_grouped_prefix_hit_is_never_evicted_by_another_groups_allocation():
    """A request admitted with a prefix hit whose cached blocks are evictable, in a pool with no
    free block: the fresh blocks group 0 allocates (evicting the least recently used cached ones)
    must not take the hit blocks of the groups after it (a block in two tables, written by a step
    while another request reads it)."""
    from flashserve.cache.kv_groups import GroupedBlockManager
    from flashserve.request import Request

    layout = kv_layout(_gemma_like(8, window=8))  # 7 local, 1 global: slab 1, 8 groups
    bm = GroupedBlockManager(8 * 4, 4, True, 0, layout)
    shared, other = list(range(3, 11)), list(range(20, 28))
    for rid, tokens in (("a", shared), ("x", other)):  # two cached prefixes fill the pool, ``shared`` oldest
        assert bm.allocate_slots(rid, 8) is not None
        request = Request(rid, tokens, SamplingParams(max_tokens=4), [2])
        request.num_computed_tokens = 8
        bm.commit(request)
        bm.free(rid)
    assert bm.num_free_blocks == 32 and bm.pool.num_evictable == 32
    hit = bm.lookup_prefix("b", shared + [40, 41, 42, 43])
    assert hit.num_tokens == 8
    assert bm.allocate_slots("b", 12, hit) is not None
    tables = bm.block_tables("b")
    assert [t[:2] for t in tables] == hit.group_blocks
    assert len({b for t in tables for b in t}) == 8 * 3  # no block in two places
    bm.assert_writable("b", 8, 12)
    bm.check_invariants()


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3")
    return str(folder), make_tiny_checkpoint("gemma3", folder, seed=6)


def test_gemma3_local_layers_hold_a_window_the_global_layer_everything(gemma):
    folder, hf = gemma
    engine = _engine(folder).engine
    layout = kv_layout(engine.model_config)  # local, global, local: slab 1, three groups
    assert layout.num_groups == 3 and [g.span for g in layout.groups] == [8, 8, None]
    prompt = prompts(1, seed=2, lo=12, hi=12)[0]
    engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=36, ignore_eos=True))
    out, held = None, []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
        if engine.has_unfinished_requests():
            held.append([sum(b != HOLE for b in t) for t in engine.block_manager.block_tables("r")])
    assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 36)
    final = held[-1]
    assert final[2] == -(-47 // 4) and max(final[:2]) <= 4  # global: all 47 tokens; local: the window
    assert engine.block_manager.num_used_blocks == 0
