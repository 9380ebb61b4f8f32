"""The Triton backend inside an engine (its kernels in the interpreter on the CPU): the layers hand
their rope to the backend, which rotates q and k and writes the KV cache in one launch
(``cache_ops.rotary_store_kv``). Greedy tokens equal those of the same engine rotating and
storing in two launches, and the fused launch is the one that ran."""

from __future__ import annotations

import os
import random

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.kernels import triton_backend
from flashserve.layers.rotary import Rotation


@pytest.mark.parametrize("arch,kv_cache_dtype", [("llama3_gqa", "auto"), ("qwen3_qknorm", "auto"), ("gemma3", "int8")])
def test_fused_rotary_store_gives_the_tokens_of_two_launches(tmp_path, monkeypatch, arch, kv_cache_dtype):
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run in the interpreter with TRITON_INTERPRET=1 (set by tests/kernels)")
    make_tiny_checkpoint(arch, tmp_path, seed=5)
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (9, 17)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    calls = []
    fused_launch = triton_backend.rotary_store_kv
    monkeypatch.setattr(triton_backend, "rotary_store_kv", lambda **kw: calls.append(1) or fused_launch(**kw))
    tokens = {}
    for fused in (True, False):
        monkeypatch.setattr(Rotation, "fused", property(lambda self, on=fused: on and self.rope.cos is None))
        llm = LLM(model=str(tmp_path), device="cpu", dtype="float32", block_size=8, max_model_len=64,
                  kv_cache_bytes=1 << 20, kv_cache_dtype=kv_cache_dtype, attention_backend="triton", verbose=False)
        tokens[fused] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert bool(calls) == fused
        calls.clear()
    assert tokens[True] == tokens[False]
    assert all(len(t) == 5 for t in tokens[True])
