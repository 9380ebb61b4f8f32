"""Offloading (issue 12): decoder-layer weights streamed from a host store (``cpu_offload_gb``)
and the prefix cache's host KV tier (``kv_host_cache_gb``), on a tiny random model on CPU.

Weights: identical greedy tokens for several offload sizes (one layer .. all of them, dense and
online int8), the offloaded tensors' bytes really live in the host store (the layers compute from
the staging buffers, and wiping the store changes the output). Host tier: a workload that evicts
cached prefixes and reuses them gives the tokens of the engine without the tier, with host hits
and fewer prefill tokens computed; the plan carries the saves and loads; 8-bit KV; Gemma 3's
several KV groups and bad sizes are clear errors."""

import random

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.cache.block_manager import BlockManager
from flashserve.cache.host_tier import HostPrefixTier
from flashserve.config import SchedulerConfig
from flashserve.kernels import kv_quant
from flashserve.request import Request
from flashserve.runner.offload import choose_layers, decoder_layers, layer_sizes
from flashserve.sched.policy import FCFSPolicy
from flashserve.sched.scheduler import Scheduler
from sched_testing import run_step

GIB = 2**30
BLOCK = 2 * 2 * 4 * 2 * 16 * 4  # bytes of one fp32 KV block of the 2-layer tiny model (block_size 4)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Five layers, so offloaded and resident layers alternate."""
    folder = tmp_path_factory.mktemp("llama_offload")
    make_tiny_checkpoint("llama3_gqa", folder, seed=21, num_hidden_layers=5)
    return str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_host_tier")
    make_tiny_checkpoint("llama3_gqa", folder, seed=22)
    return str(folder)


PROMPTS = [[3 + (7 * i + 13 * j) % 500 for j in range(5 + 4 * i)] for i in range(5)]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def engine(folder, **kw):
    return LLM(model=folder, device="cpu", block_size=4, max_model_len=128, verbose=False, **kw)


def tokens(llm, prompts=PROMPTS):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def sizes(llm):
    return layer_sizes(llm.engine.executor.worker.model)


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_offloaded_weights_give_identical_tokens(deep, quantization):
    ref_llm = engine(deep, quantization=quantization)
    ref, total = tokens(ref_llm), sum(sizes(ref_llm))
    for fraction, layers in ((0.1, 1), (0.5, 3), (1.0, 5)):
        llm = engine(deep, quantization=quantization, cpu_offload_gb=fraction * total / GIB)
        worker = llm.engine.executor.worker
        assert tokens(llm) == ref, (quantization, fraction)
        assert len(worker.offload.layer_indices) == layers
        assert worker.info.offloaded_weight_bytes >= fraction * total
        assert worker.offload.copies > 0


def test_offloaded_tensors_live_in_the_host_store(deep):
    ref = tokens(engine(deep), PROMPTS[:2])
    llm = engine(deep, cpu_offload_gb=2.5 * sizes(engine(deep))[1] / GIB)
    worker = llm.engine.executor.worker
    off, layers = worker.offload, decoder_layers(worker.model)
    assert off.layer_indices == [0, 2, 4]  # three layers spread over five
    staging = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in off.staging]
    moved = 0
    for j, i in enumerate(off.layer_indices):
        lo, hi = staging[j % 2]
        for p in layers[i].parameters():
            assert lo <= p.data_ptr() < hi, "an offloaded weight is not a view of its staging buffer"
            moved += p.numel() * p.element_size()
        for p in layers[1].parameters():  # resident layers keep their own storage
            assert not any(a <= p.data_ptr() < b for a, b in staging)
    assert moved <= off.host_bytes <= moved + 64 * 64  # the store holds exactly them (plus alignment)
    assert off.staging_bytes == 2 * max(h.numel() for h in off.host)
    assert tokens(llm, PROMPTS[:2]) == ref
    off.host[1].zero_()  # the layer in the middle computes from the store, not from a stale copy
    assert tokens(llm, PROMPTS[:2]) != ref


def test_offload_leaves_tensors_the_model_reads_outside_the_layer(tmp_path):
    """Gemma 3's one global layer has a rope module of its own, which the model also holds and
    reads before the layers run: it must stay resident when that layer is offloaded."""
    make_tiny_checkpoint("gemma3", tmp_path, seed=3)
    kw = dict(model=str(tmp_path), device="cpu", verbose=False, max_model_len=64)
    ref = tokens(LLM(**kw), PROMPTS[:3])
    llm = LLM(**kw, cpu_offload_gb=1e-9)
    assert llm.engine.executor.worker.offload.layer_indices == [1]  # the global layer
    assert tokens(llm, PROMPTS[:3]) == ref


def test_choose_layers_spreads_the_fewest_layers():
    assert choose_layers([10] * 8, 1) == [4]
    assert choose_layers([10] * 8, 40) == [1, 3, 5, 7]
    assert choose_layers([10] * 8, 41) == [0, 2, 4, 5, 7]
    assert choose_layers([10] * 8, 80) == list(range(8))


def test_offload_size_errors(deep):
    with pytest.raises(ValueError, match=r"cpu_offload_gb must be >= 0 GiB, got -1"):
        engine(deep, cpu_offload_gb=-1)
    with pytest.raises(ValueError, match=r"cpu_offload_gb=1 is more than this model's 5 decoder layers hold "
                                         r"\(0\.\d+ GiB of 0\.\d+ GiB of weights"):
        engine(deep, cpu_offload_gb=1)


# ----------------------------------------------------------------------------- loading
def test_offloaded_layers_are_built_and_loaded_in_host_memory(deep):
    """Loaded onto the meta device, which holds no bytes: every resident weight is a meta tensor,
    and the host store of each offloaded layer holds that layer's checkpoint values, so they were
    built and filled in host memory, never on the device. (Building the whole model on the
    device first, then moving the layers out, leaves nothing to copy out of a meta tensor.)"""
    from flashserve.layers.attention import get_attention_backend
    from flashserve.loader import load_model
    from flashserve.runner.offload import _layout, _view

    backend = get_attention_backend("torch", max_seq_len_cap=128)
    ref, _ = load_model(deep, "auto", torch.float32, "cpu", backend)
    per_layer = layer_sizes(ref)
    model, _ = load_model(deep, "auto", torch.float32, "meta", backend, cpu_offload_gb=2.5 * per_layer[1] / GIB)
    off = model._host_weights
    assert off.layer_indices == [0, 2, 4]
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    assert all(s.device.type == "meta" for s in off.staging) and all(h.device.type == "cpu" for h in off.host)
    layers, ref_layers = decoder_layers(model), decoder_layers(ref)
    for j, i in enumerate(off.layer_indices):
        offsets = dict(zip(map(id, off.tensors[j]), _layout(off.tensors[j])[0]))
        ref_params = dict(ref_layers[i].named_parameters())
        for name, p in layers[i].named_parameters():
            stored = _view(off.host[j], offsets[id(p)], p)
            assert torch.equal(stored, ref_params[name]), (i, name)
    assert off.host_bytes == sum(per_layer[i] for i in off.layer_indices)


def test_offloading_packed_gguf_gives_identical_tokens(tmp_path):
    """GGUF blocks kept packed (the layers' stored format is known only once they are packed):
    every decoder layer is loaded in host memory, packed, and the offloaded one stays there."""
    from test_quant_gguf import MIXED, tiny_hf, write_mixed_gguf

    path = tmp_path / "m.gguf"
    write_mixed_gguf(tiny_hf("llama3_gqa", seed=5), path, MIXED)
    (tmp_path / "no_tokenizer").mkdir()
    kw = dict(model=str(path), tokenizer=str(tmp_path / "no_tokenizer"), device="cpu", block_size=4,
              max_model_len=64, verbose=False)
    ref = tokens(LLM(**kw), PROMPTS[:3])
    llm = LLM(**kw, cpu_offload_gb=1e-9)
    worker = llm.engine.executor.worker
    assert worker.offload.layer_indices == [1]
    assert decoder_layers(worker.model)[1].self_attn.qkv_proj.quant_method.label.startswith("gguf-")
    assert tokens(llm, PROMPTS[:3]) == ref


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_each_rank_offloads_its_own_layers(tiny, tp, pp):
    ref = tokens(engine(tiny), PROMPTS[:3])
    llm = engine(tiny, cpu_offload_gb=1e-9, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        assert llm.engine.worker.info.offloaded_weight_bytes > 0  # rank 0's share
        assert tokens(llm, PROMPTS[:3]) == ref
    finally:
        llm.engine.shutdown()


def test_first_layers_drafts_with_offloaded_layers(deep):
    """Self-speculation runs passes that stop after the first layers (the next offloaded layer's
    copy is joined at the final norm): the tokens of the same drafts without offloading."""
    spec = {"method": "layers", "num_layers": 2, "num_speculative_tokens": 3}
    ref_llm = engine(deep, speculative_config=spec)
    ref = tokens(ref_llm, PROMPTS[:3])
    llm = engine(deep, speculative_config=spec, cpu_offload_gb=2.5 * sizes(ref_llm)[1] / GIB)
    assert llm.engine.executor.worker.offload.layer_indices == [0, 2, 4]
    assert tokens(llm, PROMPTS[:3]) == ref


def test_offloading_refuses_early_exit(deep):
    with pytest.raises(ValueError, match=r"cpu_offload_gb does not work with early exit"):
        engine(deep, cpu_offload_gb=1e-9, early_exit_config={"threshold": 0.5, "exit_layers": [2]})


# ----------------------------------------------------------------------------- host KV tier
def test_scheduler_plans_saves_then_loads_of_evicted_prefix_blocks():
    bm = BlockManager(6, 4, enable_prefix_caching=True, num_host_blocks=2)
    bm.attach_host_tier(HostPrefixTier(8, first_id=2))
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), bm, FCFSPolicy(), max_model_len=64)
    greedy = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prefix = list(range(10, 22))  # 3 full blocks
    s.add_request(Request("a", prefix + [1], greedy, eos_token_ids=[0]))
    run_step(s)  # a finishes: blocks 0, 1, 2 cached, block 3 free
    s.add_request(Request("b", list(range(100, 121)), greedy, eos_token_ids=[0]))  # 6 blocks: evicts all three
    plan = run_step(s)
    assert plan.block_copies.host_save == ((2, 2), (1, 3), (0, 4))  # evicted tail first
    assert bm.pool.num_evictions == 3 and len(bm.host_tier) == 3
    s.add_request(Request("c", prefix + [5, 6], greedy, eos_token_ids=[0]))
    plan = run_step(s)
    (c,) = plan.requests
    assert c.start_pos == 12 and c.num_new_tokens == 2  # the prefix came back from the host
    assert plan.block_copies.swap_in == tuple(zip((4, 3, 2), c.new_block_ids[:3]))
    # c's fresh blocks evicted three of b's: saved to new host blocks, not to the three being loaded
    assert sorted(h for _, h in plan.block_copies.host_save) == [5, 6, 7]
    assert bm.host_tier_hits == 12 and s.requests.get("c") is None
    bm.check_invariants()


def host_tier_workload():
    """Long shared prefixes, a flood of other prompts that evicts them, then the prefixes again."""
    rng = random.Random(5)
    stems = [[rng.randrange(3, 500) for _ in range(24)] for _ in range(3)]
    first = [stem + [rng.randrange(3, 500) for _ in range(3)] for stem in stems]
    flood = [[rng.randrange(3, 500) for _ in range(30)] for _ in range(4)]
    again = [stem + [rng.randrange(3, 500) for _ in range(5)] for stem in stems]
    return [first, flood, again]


def run_waves(llm):
    """Each wave to completion, in order; tokens and the prompt tokens served from a cache."""
    toks, cached = [], 0
    for wave in host_tier_workload():
        for o in llm.generate(wave, GREEDY, use_tqdm=False):
            toks.append(o.outputs[0].token_ids)
            cached += o.num_cached_tokens
    return toks, cached


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_host_tier_brings_evicted_prefixes_back(tiny, kv_cache_dtype):
    block = BLOCK if kv_cache_dtype == "auto" else 2 * 2 * kv_quant.block_bytes(4, 2, 16)  # values + scales
    small = dict(kv_cache_bytes=44 * block, max_num_batched_tokens=64, kv_cache_dtype=kv_cache_dtype)
    plain = engine(tiny, **small)
    ref, cached_plain = run_waves(plain)
    tiered = engine(tiny, kv_host_cache_gb=64 * block / GIB, **small)
    got, cached_tier = run_waves(tiered)
    assert got == ref
    bm = tiered.engine.block_manager
    assert plain.engine.block_manager.pool.num_evictions > 0  # the flood did evict the prefixes
    assert bm.host_tier.num_saved > 0 and bm.host_tier_hits >= 3 * 24 - 4  # nearly all three stems came back
    assert cached_tier - cached_plain == bm.host_tier_hits  # fewer prompt tokens computed, by the host hits
    assert tiered.engine.stats().prefix_cache_host_hits == bm.host_tier_hits
    bm.check_invariants()
    assert bm.num_used_blocks == 0


def test_host_tier_under_batching_preemption_and_scoring(tiny):
    """Batched, overlapped, with swap preemption sharing the host space: tokens unchanged."""
    rng = random.Random(8)
    stem = [rng.randrange(3, 500) for _ in range(20)]
    prompts = [stem[: rng.randrange(8, 20)] + [rng.randrange(3, 500) for _ in range(rng.randrange(4, 30))]
               for _ in range(12)]
    kw = dict(kv_cache_bytes=34 * BLOCK, max_num_batched_tokens=40, preemption_mode="swap",
              swap_space_bytes=32 * BLOCK)
    plain = engine(tiny, **kw)
    ref = tokens(plain, prompts) + tokens(plain, prompts[::-1])
    llm = engine(tiny, kv_host_cache_gb=16 * BLOCK / GIB, **kw)
    got = tokens(llm, prompts)
    list(llm.engine.score(list(range(3, 80)), chunk_size=32))  # overwrites evicted blocks outside a plan
    got += tokens(llm, prompts[::-1])
    assert got == ref
    bm = llm.engine.block_manager
    assert bm.host_tier.num_saved > 0 and llm.engine.scheduler.num_swap_outs > 0
    bm.check_invariants()


def test_host_tier_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"kv_host_cache_gb must be >= 0 GiB, got -0.5"):
        engine(tiny, kv_host_cache_gb=-0.5)
    with pytest.raises(ValueError, match=r"kv_host_cache_gb .* needs prefix caching"):
        engine(tiny, kv_host_cache_gb=0.01, enable_prefix_caching=False)
    with pytest.raises(ValueError, match=r"kv_host_cache_gb=1e-09 holds no KV block of 2048 bytes"):
        engine(tiny, kv_host_cache_gb=1e-9, kv_cache_bytes=1 << 20)
    make_tiny_checkpoint("gemma3", tmp_path, seed=3)
    with pytest.raises(ValueError, match=r"not supported for models whose layers keep different KV spans \(3 groups"):
        LLM(model=str(tmp_path), device="cpu", verbose=False, kv_host_cache_gb=0.01, max_model_len=64)
