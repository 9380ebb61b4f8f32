"""Tensor / pipeline parallelism over NCCL (one GPU per rank): the same greedy tokens as one GPU.
Needs two GPUs (skipped on one: the follow-up measurement issue runs it on several H200s)."""

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_nccl_ranks_give_the_same_tokens_as_one_gpu(tmp_path, tp, pp):
    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=4)
    prompts = [[5 + i, 9, 200, 31, 7 * i + 3, 77] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = {}
    for sizes in ((1, 1), (tp, pp)):
        llm = LLM(model=str(tmp_path), device="cuda", dtype="float32", block_size=16, max_model_len=128,
                  kv_cache_bytes=1 << 24, tensor_parallel_size=sizes[0], pipeline_parallel_size=sizes[1],
                  verbose=False)
        try:
            outs[sizes] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.engine.shutdown()
    assert outs[(tp, pp)] == outs[(1, 1)]
