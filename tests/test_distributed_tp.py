"""Tensor parallelism on CPU (gloo, 2 processes): the same greedy tokens as one process under
batching, chunking and preemption, for dense, online-quantized and GGUF-packed weights, GQA with
sharded KV heads, MQA with a replicated one and a tied vocabulary-parallel head; clear errors for
shapes that do not split and more ranks than devices; a killed or stopped rank is named and the
engine shuts down within the timeout."""

import random

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from process_faults import assert_killed_process_is_named, assert_stopped_process_times_out
from flashserve import LLM, SamplingParams

BLOCK = 2 * 2 * 4 * 2 * 16 * 4  # bytes of one fp32 block of llama3_gqa: layers x K/V x 4 tokens x 2 KV heads x 16
MHA_BLOCK = 2 * BLOCK  # llama_mha_tied: 4 KV heads


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for arch in ("llama3_gqa", "llama_mqa_linear", "llama_mha_tied"):
        folder = tmp_path_factory.mktemp(arch)
        make_tiny_checkpoint(arch, folder, seed=7)
        out[arch] = str(folder)
    return out


def workload(n=8):
    rng = random.Random(5)
    stem = [rng.randrange(3, 500) for _ in range(20)]
    prompts = [stem[: rng.randrange(6, 20)] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 24))]
               for _ in range(n)]
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, seed=9, max_tokens=12, ignore_eos=True)]
    return prompts, [params[i % 2] for i in range(n)]


def tokens(folder, max_model_len=128, **kw):
    prompts, params = workload()
    llm = LLM(model=folder, device="cpu", block_size=4, max_model_len=max_model_len, verbose=False, **kw)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.engine.scheduler.num_preemptions
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("arch", ["llama3_gqa", "llama_mqa_linear", "llama_mha_tied"])
def test_tp2_gives_the_same_tokens_as_one_process(ckpts, arch):
    ref, _ = tokens(ckpts[arch], kv_cache_bytes=1 << 20, max_num_batched_tokens=24)
    got, _ = tokens(ckpts[arch], kv_cache_bytes=1 << 20, max_num_batched_tokens=24, tensor_parallel_size=2)
    assert got == ref


def test_tp2_under_preemption(ckpts):
    # KV bytes are per rank: each rank holds half the KV heads, so half the bytes give as many blocks
    kw = dict(max_model_len=64, preemption_mode="recompute", max_num_batched_tokens=40)
    ref, n_ref = tokens(ckpts["llama3_gqa"], kv_cache_bytes=24 * BLOCK, **kw)
    got, n_got = tokens(ckpts["llama3_gqa"], kv_cache_bytes=12 * BLOCK, tensor_parallel_size=2, **kw)
    assert n_ref > 0 and n_got == n_ref
    assert got == ref


def scores(folder, ids, **kw):
    llm = LLM(model=folder, device="cpu", block_size=4, max_model_len=128, kv_cache_bytes=1 << 20, verbose=False,
              **kw)
    try:
        return torch.cat(list(llm.engine.score(ids, chunk_size=16)))
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("mode", ["int8", "int4-g32"])
def test_tp2_with_online_quantization(ckpts, mode):
    """Groups of 32 inside each rank's input columns give the same int4 weights as one process;
    int8 rows are scaled per rank's half of a row-parallel layer. The CPU kernels take bf16
    activations, so partial sums round differently: log-probs agree to the kernels' tolerance
    (top-1 is not compared: the random tiny model's int8 head has near-ties)."""
    ids = [random.Random(1).randrange(3, 500) for _ in range(48)]
    ref = scores(ckpts["llama3_gqa"], ids, quantization=mode)
    got = scores(ckpts["llama3_gqa"], ids, quantization=mode, tensor_parallel_size=2)
    dense = scores(ckpts["llama3_gqa"], ids, quantization="none")
    err = (got - ref).abs().max().item()
    assert err < 0.01 * ref.abs().max().item()
    assert err < (dense - ref).abs().max().item() or mode == "int4-g32"  # smaller than the quantization error


def test_tp2_with_packed_gguf_blocks(tmp_path):
    from test_quant_gguf import MIXED, tiny_hf, write_mixed_gguf

    path = tmp_path / "m.gguf"
    write_mixed_gguf(tiny_hf("llama3_gqa", seed=2), path, MIXED)  # K-quants, Q8_0, Q5_0, Q4_1 ... packed
    (tmp_path / "no_tokenizer").mkdir()  # prompts as token ids
    kw = dict(model=str(path), tokenizer=str(tmp_path / "no_tokenizer"), device="cpu", block_size=4, max_model_len=64,
              kv_cache_bytes=1 << 21, verbose=False)
    prompts = [[5, 9, 200, 31, 7, 77], [300, 2, 8]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = {}
    for tp in (1, 2):
        llm = LLM(tensor_parallel_size=tp, **kw)
        try:
            layer = llm.engine.worker.model.model.layers[0]
            assert layer.self_attn.qkv_proj.quant_method.label.startswith("gguf-")
            outs[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.engine.shutdown()
    assert outs[2] == outs[1]


def test_shapes_that_do_not_split_are_clear_errors(ckpts):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 does not divide the number of attention heads \(9\)"):
        LLM(device="cpu", tensor_parallel_size=2, verbose=False)  # SmolLM2-135M: 9 query heads, 3 KV heads
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=3 is larger than the number of layers \(2\)"):
        LLM(model=ckpts["llama3_gqa"], device="cpu", pipeline_parallel_size=3, verbose=False)


def test_more_ranks_than_gpus_is_a_clear_error(ckpts, monkeypatch):
    from flashserve.config import EngineConfig
    from flashserve.distributed.executor import check_parallel_config
    from flashserve.loader import load_model_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = EngineConfig(model=ckpts["llama3_gqa"], device="cuda", tensor_parallel_size=2, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 x pipeline_parallel_size=2 needs 4 GPUs "
                                         r"\(one per rank\), but this host has 1"):
        check_parallel_config(config, load_model_config(ckpts["llama3_gqa"]))


def _started(folder, timeout_s=30.0):
    llm = LLM(model=folder, device="cpu", block_size=4, max_model_len=128, kv_cache_bytes=1 << 20, verbose=False,
              tensor_parallel_size=2, distributed_timeout_s=timeout_s)
    engine = llm.engine
    engine.add_request("a", list(range(3, 20)), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    engine.step()
    return engine


def test_killed_rank_is_named_and_the_engine_shuts_down(ckpts):
    engine = _started(ckpts["llama3_gqa"])
    proc = engine.executor.processes[0]
    assert_killed_process_is_named(engine, proc, rf"tensor-parallel rank 1 \(pid {proc.pid}\) was killed by SIGKILL",
                                   "the distributed engine is down: tensor-parallel rank 1", steps=20)
    assert "rank 1" in engine.executor.dead_reason


def test_stopped_rank_times_out_with_a_clear_error(ckpts):
    engine = _started(ckpts["llama3_gqa"], timeout_s=3.0)
    proc = engine.executor.processes[0]
    assert_stopped_process_times_out(engine, proc, rf"tensor-parallel rank 1 \(pid {proc.pid}\) is stopped", steps=20)


def test_threads_restored_after_shutdown(ckpts):
    before = torch.get_num_threads()
    tokens(ckpts["llama_mha_tied"], kv_cache_bytes=1 << 20, tensor_parallel_size=2)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_pipeline_stages_give_the_same_tokens(ckpts, tp, pp):
    ref, n_ref = tokens(ckpts["llama_mha_tied"], max_model_len=64, kv_cache_bytes=24 * MHA_BLOCK,
                        preemption_mode="recompute", max_num_batched_tokens=24)
    # each stage holds one of the two layers (and tensor ranks half the heads): fewer bytes, as many blocks
    got, n_got = tokens(ckpts["llama_mha_tied"], max_model_len=64, kv_cache_bytes=24 * MHA_BLOCK // (2 * tp),
                        preemption_mode="recompute", max_num_batched_tokens=24, tensor_parallel_size=tp,
                        pipeline_parallel_size=pp)
    assert n_ref > 0 and n_got > 0  # micro-batches schedule differently: preempted, but not as often
    assert got == ref


def test_tp2_runs_multi_step_plans(ckpts):
    """Every rank runs a multi-step plan's model steps alike (greedy rows, and seeded sampling rows
    drawing by their output position): the tokens of one process's one-step plans; and the
    logprobs of rows that ask for them, within fp32 tolerance of one process's."""
    want, _ = tokens(ckpts["llama3_gqa"], kv_cache_bytes=1 << 20)
    prompts, params = workload()
    with_logprobs = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)] * 3
    one = LLM(model=ckpts["llama3_gqa"], device="cpu", block_size=4, max_model_len=128, verbose=False,
              kv_cache_bytes=1 << 20).generate(prompts[:3], with_logprobs, use_tqdm=False)
    llm = LLM(model=ckpts["llama3_gqa"], device="cpu", block_size=4, max_model_len=128, verbose=False,
              kv_cache_bytes=1 << 20, tensor_parallel_size=2, num_scheduler_steps=4)
    steps, schedule = [], llm.engine.core.schedule
    llm.engine.core.schedule = lambda: steps.append(plan := schedule()) or plan
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        first = len(steps)
        many = llm.generate(prompts[:3], with_logprobs, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    assert got == want
    four = [p.decodes is not None and p.decodes.num_steps == 4 for p in steps]
    assert any(four[:first]) and any(four[first:])
    for a, b in zip(one, many):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for (tok_a, lp_a, top_a), (tok_b, lp_b, top_b) in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert tok_a == tok_b and abs(lp_a - lp_b) < 1e-4 and len(top_b) == 3
            assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(top_a, top_b))
