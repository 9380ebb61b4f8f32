"""End to end on the GPU: the Triton + CUDA-graph path gives the same greedy tokens as the torch
path and as transformers, on the tiny checkpoints and on the real SmolLM2 model (fp32, so that
greedy ties cannot flip between implementations). Skipped without a CUDA device.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from conftest_models import TINY_ARCHS, make_tiny_checkpoint
from flashserve import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _engines(model: str | None, **kw) -> dict[str, LLM]:
    common = dict(model=model, device="cuda", dtype="float32", verbose=False, **kw)
    return {
        "torch": LLM(attention_backend="torch", cuda_graphs=False, **common),
        "triton+graphs": LLM(attention_backend="triton", cuda_graphs=True, **common),
    }


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_tiny_triton_graphs_equal_torch_and_transformers(tmp_path, arch):
    hf = make_tiny_checkpoint(arch, tmp_path, seed=3).cuda()
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 60))] for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = {name: [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            for name, llm in _engines(str(tmp_path), block_size=16, max_model_len=256, max_num_seqs=16,
                                      kv_cache_bytes=64 << 20).items()}
    assert outs["triton+graphs"] == outs["torch"]
    assert outs["torch"] == [_hf_greedy(hf, p, 32) for p in prompts]


def test_smollm2_triton_graphs_equal_torch_and_transformers():
    from transformers import AutoModelForCausalLM

    from flashserve.loader import default_model_path

    path = default_model_path()
    engines = _engines(None, max_model_len=1024, max_num_seqs=8, kv_cache_bytes=256 << 20)
    chats = [[{"role": "user", "content": q}] for q in
             ("What is the capital of France?", "Write a haiku about GPUs.", "Name three prime numbers.")]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = {name: [o.token_ids for o in llm.chat(chats, params, use_tqdm=False)] for name, llm in engines.items()}
    assert outs["triton+graphs"] == outs["torch"]
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).cuda().eval()
    llm = engines["torch"]
    for chat, ours in zip(chats, outs["torch"]):
        ids = llm.tokenizer(llm.engine.apply_chat_template(chat), add_special_tokens=False)["input_ids"]
        assert ours[:16] == _hf_greedy(hf, ids, 16)
