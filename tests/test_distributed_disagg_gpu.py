"""Disaggregated prefill/decode on CUDA: both Workers on one GPU (KV through host memory over gloo,
since NCCL refuses two ranks on one device), and on two GPUs (KV over NCCL): the same greedy
tokens as one GPU. fp32 with a tiny checkpoint, so batch composition (prefill and decode no
longer share steps) does not change an argmax."""

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _tokens(folder, **kw):
    prompts = [[5 + i, 9, 200, 31, 7 * i + 3, 77] * (1 + i % 4) for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(model=folder, dtype="float32", block_size=16, max_model_len=256, kv_cache_bytes=1 << 24,
              verbose=False, **kw)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)], llm.engine
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("device", ["cuda:0", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 GPUs (prefill on GPU 0, decode on GPU 1)"))])
def test_disaggregated_on_gpu_gives_the_tokens_of_one_gpu(tmp_path, device):
    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=4)
    ref, _ = _tokens(str(tmp_path), device="cuda:0")
    got, engine = _tokens(str(tmp_path), device=device, disaggregated=True)
    assert engine.core.num_transfers == 8
    assert got == ref
