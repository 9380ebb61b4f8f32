"""Offloading on CUDA: weights streamed from pinned host memory on a side stream, inside captured
CUDA graphs and eager, give the tokens of the engine without offloading (dense, online int8 and
fp8, first-layers drafts); a model larger than the process's memory limit loads with offloading
(its offloaded layers never on the device); the host KV tier's asynchronous saves and loads give
the tokens of the engine without the tier."""

from __future__ import annotations

import gc
import json
import random

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_offload_gpu")
    make_tiny_checkpoint("llama3_gqa", folder, seed=31, num_hidden_layers=5)
    return str(folder)


def engine(folder, **kw):
    return LLM(folder, **{**dict(device="cuda", dtype="float32", block_size=16, max_model_len=256, max_num_seqs=16,
                                 verbose=False), **kw})


def prompts(n=12, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(4, 60))] for _ in range(n)]


def tokens(llm, ps):
    return [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_offloaded_weights_on_cuda_give_identical_tokens(deep, cuda_graphs):
    from flashserve.runner.offload import layer_sizes

    ref_llm = engine(deep, cuda_graphs=cuda_graphs)
    ps = prompts()
    ref = tokens(ref_llm, ps)
    total = sum(layer_sizes(ref_llm.engine.worker.model))
    for fraction in (0.5, 1.0):
        llm = engine(deep, cuda_graphs=cuda_graphs, cpu_offload_gb=fraction * total / 2**30)
        worker = llm.engine.worker
        assert (worker.graphs is not None) == cuda_graphs
        assert all(h.is_pinned() for h in worker.offload.host)
        assert tokens(llm, ps) == ref, fraction
        assert tokens(llm, ps[::-1]) == ref[::-1]  # other batch shapes (other graphs)


@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_offloaded_quantized_layers_on_cuda_give_identical_tokens(deep, quantization):
    """Quantized layers are loaded in host memory and quantized on the device one at a time (their
    stored format is the device's), then go back to the host store."""
    from flashserve.runner.offload import layer_sizes

    ref_llm = engine(deep, dtype="bfloat16", quantization=quantization)
    ps = prompts()
    ref = tokens(ref_llm, ps)
    total = sum(layer_sizes(ref_llm.engine.worker.model))
    llm = engine(deep, dtype="bfloat16", quantization=quantization, cpu_offload_gb=0.5 * total / 2**30)
    assert llm.engine.worker.offload.layer_indices == [0, 2, 4]
    assert llm.engine.worker.info.offloaded_weight_bytes >= 0.5 * total
    assert tokens(llm, ps) == ref


def test_first_layers_drafts_with_offloaded_layers_in_cuda_graphs(deep):
    """The draft pass stops after two layers with the next offloaded layer's copy in flight: it is
    joined at the final norm, so the draft's graphs capture (and replay) without unjoined work."""
    from flashserve.runner.offload import layer_sizes

    spec = {"method": "layers", "num_layers": 2, "num_speculative_tokens": 3}
    ref_llm = engine(deep, speculative_config=spec)
    ps = prompts()
    ref = tokens(ref_llm, ps)
    one_layer = layer_sizes(ref_llm.engine.worker.model)[1]
    llm = engine(deep, speculative_config=spec, cpu_offload_gb=2.5 * one_layer / 2**30)
    assert llm.engine.worker.offload.layer_indices == [0, 2, 4] and llm.engine.worker.graphs is not None
    assert tokens(llm, ps) == ref


def write_config(folder):
    """A Llama of 2.2 GB in bf16: 16 decoder layers of 121 MB, embedding and head of 131 MB each."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
              "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 16,
              "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_a_model_larger_than_the_memory_limit_loads_with_offloading(tmp_path):
    """With the process limited below the model's weight bytes, the plain engine runs out of
    memory; with 3/4 of the decoder layers offloaded the model loads (its offloaded layers are
    built, filled and kept in host memory), gives the tokens of the plain engine run without the
    limit, and loading peaks at the resident weights plus the staging buffers plus one tensor
    (random weights for a host-built layer are drawn on the device, one tensor at a time)."""
    from flashserve.layers.attention import get_attention_backend
    from flashserve.loader import load_model
    from flashserve.quant import stored_bytes
    from flashserve.runner.offload import layer_sizes

    folder = write_config(tmp_path)
    kw = dict(load_format="dummy", dtype="bfloat16", kv_cache_bytes=64 << 20, max_num_batched_tokens=512)
    ps = prompts()
    plain = engine(folder, **kw)
    ref = tokens(plain, ps)
    weight_bytes = stored_bytes(plain.engine.worker.model)
    layers = layer_sizes(plain.engine.worker.model)
    del plain
    gc.collect()
    torch.cuda.empty_cache()
    offload_gb = 0.75 * sum(layers) / 2**30

    device = torch.device("cuda")
    backend = get_attention_backend("triton", max_seq_len_cap=256)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model, _ = load_model(folder, "dummy", torch.bfloat16, device, backend, cpu_offload_gb=offload_gb)
    peak = torch.cuda.max_memory_allocated() - before
    off = model._host_weights
    streamed = off.streamed()
    resident = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]
                                                          if id(t) not in streamed}.values())
    assert len(off.layer_indices) == 12 and off.host_bytes >= 0.75 * sum(layers)
    assert peak <= resident + off.staging_bytes + max(layers), (peak, resident, off.staging_bytes)
    assert resident + off.staging_bytes + max(layers) < weight_bytes
    del model, off
    gc.collect()
    torch.cuda.empty_cache()

    budget = weight_bytes - sum(layers) // 4  # well above what the offloading engine needs, below the weights
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + budget)
                                               / torch.cuda.get_device_properties(device).total_memory)
    try:
        llm = engine(folder, cpu_offload_gb=offload_gb, **kw)
        assert tokens(llm, ps) == ref
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        with pytest.raises(torch.OutOfMemoryError):
            engine(folder, **kw)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        gc.collect()
        torch.cuda.empty_cache()


def test_host_tier_on_cuda_gives_identical_tokens(deep):
    block = 5 * 2 * 16 * 2 * 16 * 4  # fp32 bytes of one block: layers x K/V x 16 tokens x 2 heads x 16
    kw = dict(kv_cache_bytes=40 * block, max_num_batched_tokens=128)
    rng = random.Random(4)
    stems = [[rng.randrange(3, 500) for _ in range(100)] for _ in range(3)]
    waves = [[s + [rng.randrange(3, 500)] for s in stems], prompts(16, seed=5), [s + [7, 8, 9] for s in stems]]
    plain = engine(deep, **kw)
    ref = [tokens(plain, w) for w in waves]
    tiered = engine(deep, kv_host_cache_gb=64 * block / 2**30, **kw)
    assert [tokens(tiered, w) for w in waves] == ref
    bm = tiered.engine.block_manager
    assert bm.host_tier_hits >= 3 * 96 and tiered.engine.worker.swap_space.pinned
