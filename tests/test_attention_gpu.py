"""Windowed and Quest attention through the whole engine on the GPU (Triton kernels, CUDA graphs):
tiny random Mistral (sliding window) and Gemma 3 (local / global layers, one block table per group)
checkpoints decode exactly what transformers decodes, with windows released under a tight KV
budget; Quest at a budget of 1 selects every page, so it decodes what full attention decodes;
sinks + window equals the torch backend. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from test_engine import hf_greedy, prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS = 32


def _engine(folder: str, **kw) -> LLM:
    kw.setdefault("kv_cache_bytes", 16 << 20)
    return LLM(folder, device="cuda", dtype="float32", block_size=4, max_model_len=256, max_num_seqs=8,
               max_num_batched_tokens=64, verbose=False, **kw)


@pytest.mark.parametrize("arch", ["mistral_swa", "gemma3"])
@pytest.mark.parametrize("graphs", [False, True])
def test_windowed_models_decode_transformers_tokens(tmp_path, arch, graphs):
    hf = make_tiny_checkpoint(arch, tmp_path, seed=6)
    batch = prompts(6, seed=2, lo=10, hi=40)  # longer than the window of 8
    llm = _engine(str(tmp_path), cuda_graphs=graphs)
    outs = llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(batch, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, STEPS)  # transformers on the CPU, fp32


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_attn_llama")
    make_tiny_checkpoint("qwen3_qknorm", folder, seed=3)
    return str(folder)


def _tokens(llm: LLM, batch) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]


def test_quest_at_full_budget_equals_full_attention(llama):
    batch = prompts(6, seed=3, lo=20, hi=90)
    full = _tokens(_engine(llama, cuda_graphs=True), batch)
    assert _tokens(_engine(llama, cuda_graphs=True, attention="quest", kv_budget=1.0), batch) == full


def test_sinks_window_triton_equals_torch_backend(llama):
    batch = prompts(6, seed=4, lo=20, hi=90)
    opts = dict(attention="sinks", attention_window=16, attention_sinks=4)
    triton = _tokens(_engine(llama, cuda_graphs=True, attention_backend="triton", **opts), batch)
    assert triton == _tokens(_engine(llama, cuda_graphs=False, attention_backend="torch", **opts), batch)
