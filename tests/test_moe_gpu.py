"""MoE models end to end on the GPU (skipped without CUDA): with the Triton backend, the fused MoE
kernel and CUDA graphs (decode and mixed steps), greedy tokens equal transformers' in fp32 for
Mixtral, Qwen2-MoE and Qwen3-MoE, and equal the same engine's eager, per-expert-loop tokens; int8 / fp8
experts on the fused kernels match the loop; experts split over 2 GPUs (when there are 2) give one
GPU's tokens."""

from __future__ import annotations

import random

import pytest
import torch

from flashserve import LLM, SamplingParams
from flashserve.layers.moe import MoEMLP
from test_moe_models import TINY_MOE, hf_greedy, make_tiny_moe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def _prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(1, 60))] for _ in range(8)]


@pytest.mark.parametrize("arch", list(TINY_MOE))
def test_fused_moe_engine_with_graphs_matches_transformers(arch, tmp_path):
    hf = make_tiny_moe(arch, tmp_path, seed=7)
    llm = LLM(model=str(tmp_path), device="cuda", dtype="float32", attention_backend="triton", cuda_graphs=True,
              block_size=16, max_model_len=256, max_num_seqs=8, kv_cache_bytes=64 << 20, verbose=False)
    assert all(m.triton for m in llm.engine.worker.model.modules() if isinstance(m, MoEMLP))
    batch = _prompts()
    outs = llm.generate(batch, GREEDY, use_tqdm=False)
    hf = hf.cuda()
    for p, o in zip(batch, outs):
        assert o.token_ids == hf_greedy(hf, p, 32)
    eager = LLM(model=str(tmp_path), device="cuda", dtype="float32", attention_backend="torch", cuda_graphs=False,
                block_size=16, max_model_len=256, max_num_seqs=8, kv_cache_bytes=64 << 20, verbose=False)
    assert [o.token_ids for o in eager.generate(batch, GREEDY, use_tqdm=False)] == [o.token_ids for o in outs]


def test_bf16_fused_and_loop_logits_close(tmp_path):
    make_tiny_moe("qwen3_moe", tmp_path, seed=8)
    prompt = sum(_prompts(), [])[:64]
    logits = []
    for backend in ("triton", "torch"):
        llm = LLM(model=str(tmp_path), device="cuda", dtype="bfloat16", attention_backend=backend, cuda_graphs=False,
                  block_size=16, max_model_len=256, max_num_seqs=8, kv_cache_bytes=64 << 20, verbose=False)
        logits.append(torch.cat(list(llm.engine.score(prompt, chunk_size=64))))  # [L - 1, V] log-probs
    torch.testing.assert_close(logits[0], logits[1], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_experts_fused_with_graphs_match_the_loop(mode, tmp_path):
    """int8 / fp8 experts: the fused kernels (decode and grouped paths, CUDA graphs) give the
    log-probs and greedy tokens of the per-expert loop on the dequantized experts, fp32 activations."""
    make_tiny_moe("mixtral", tmp_path, seed=9)
    prompt = sum(_prompts(), [])[:64]
    runs = []
    for backend, graphs in (("triton", True), ("torch", False)):
        llm = LLM(model=str(tmp_path), device="cuda", dtype="float32", attention_backend=backend, cuda_graphs=graphs,
                  block_size=16, max_model_len=256, max_num_seqs=8, kv_cache_bytes=64 << 20, quantization=mode,
                  verbose=False)
        moe = [m for m in llm.engine.worker.model.modules() if isinstance(m, MoEMLP)]
        assert moe and all(m.triton == (backend == "triton") and m.experts.tensors()[2] is not None for m in moe)
        scores = torch.cat(list(llm.engine.score(prompt, chunk_size=64)))
        tokens = [o.token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
        runs.append((scores, tokens))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=2e-3, rtol=1e-3)
    assert runs[0][1] == runs[1][1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_expert_parallel_over_nccl_gives_one_gpus_tokens(tmp_path):
    """Experts split over 2 GPUs (NCCL all-reduce, fused kernels, graphs): one GPU's greedy tokens."""
    make_tiny_moe("qwen2_moe", tmp_path, seed=10)
    outs = []
    for tp in (1, 2):
        llm = LLM(model=str(tmp_path), device="cuda", dtype="float32", attention_backend="triton", block_size=16,
                  max_model_len=256, kv_cache_bytes=64 << 20, tensor_parallel_size=tp, verbose=False)
        try:
            outs.append([o.token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)])
        finally:
            llm.engine.shutdown()
    assert outs[0] == outs[1]
