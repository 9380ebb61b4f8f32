"""The L2 prefetch of each layer's output projection on the GPU (skipped without CUDA or below
compute capability 9.0): every decoder layer plans it after loading, and decoding with it (eager
and in CUDA graphs, launched with PDL) gives the tokens and log-probabilities of the same engine
without it, bit for bit (a prefetch changes no value)."""

from __future__ import annotations

import random

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.kernels import l2_prefetch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="needs a Hopper GPU")]


def _run(path: str, cuda_graphs: bool) -> tuple[LLM, list]:
    llm = LLM(model=path, device="cuda", dtype="bfloat16", attention_backend="triton", cuda_graphs=cuda_graphs,
              block_size=16, max_model_len=256, max_num_seqs=4, kv_cache_bytes=64 << 20, verbose=False)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (20, 7)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1),
                        use_tqdm=False)
    return llm, [(o.token_ids, o.logprobs) for o in outs]


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_prefetch_is_planned_and_changes_no_token(tmp_path, monkeypatch, cuda_graphs):
    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=7, hidden_size=512, intermediate_size=1024, head_dim=64)
    monkeypatch.setattr(l2_prefetch, "ENABLED", True)
    llm, with_prefetch = _run(str(tmp_path), cuda_graphs)
    for layer in llm.engine.worker.model.model.layers:
        o = layer.self_attn.o_proj.weight
        assert [s.data_ptr() for s in layer.self_attn.prefetch.spans] == [o.data_ptr()]
    del llm
    monkeypatch.setattr(l2_prefetch, "ENABLED", False)
    llm, without = _run(str(tmp_path), cuda_graphs)
    assert all(layer.self_attn.prefetch is None for layer in llm.engine.worker.model.model.layers)
    assert with_prefetch == without
