"""LoRA adapters on the GPU (Triton kernels, CUDA graphs for decode and mixed steps): a batch of
two adapters' and the base model's requests gives PEFT's greedy tokens (fp32), and the same with
graphs off; adapters loaded into a slot after capture are what the graphs replay. Skipped
without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from conftest_lora import greedy_tokens, load_base, peft_oracle, write_peft_adapter
from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from test_engine import prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
NEW = 24


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_adapters_and_base_in_one_batch_match_peft_on_gpu(tmp_path, cuda_graphs):
    base = tmp_path / "base"
    make_tiny_checkpoint("qwen3_qknorm", base, seed=8)
    adapters = {"all": str(write_peft_adapter(base, tmp_path / "all", seed=1, r=8, alpha=16)),
                "qv": str(write_peft_adapter(base, tmp_path / "qv", seed=2, targets=("q_proj", "v_proj")))}
    llm = LLM(str(base), device="cuda", dtype="float32", block_size=16, max_model_len=256, max_num_seqs=16,
              max_num_batched_tokens=64, kv_cache_bytes=64 << 20, verbose=False, lora_modules=adapters,
              cuda_graphs=cuda_graphs)
    batch = prompts(6, seed=31, lo=3, hi=90)
    names = ["all", None, "qv", "qv", "all", None]
    outs = llm.generate(batch, [SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, lora=n) for n in names],
                        use_tqdm=False)
    oracles = {None: load_base(base), **{n: peft_oracle(base, p) for n, p in adapters.items()}}
    for prompt, out, name in zip(batch, outs, names):
        assert out.token_ids == greedy_tokens(oracles[name], prompt, NEW), name


def test_adapters_loaded_after_graph_capture_match_peft_on_gpu(tmp_path):
    """Slots written in place after the CUDA graphs were captured: the replayed graphs read the
    loaded adapter (and, once it is removed and another loaded into its slot, that one)."""
    base = tmp_path / "base"
    make_tiny_checkpoint("qwen3_qknorm", base, seed=8)
    adapters = {"all": str(write_peft_adapter(base, tmp_path / "all", seed=1, r=8, alpha=16)),
                "qv": str(write_peft_adapter(base, tmp_path / "qv", seed=2, targets=("q_proj", "v_proj")))}
    llm = LLM(str(base), device="cuda", dtype="float32", block_size=16, max_model_len=256, max_num_seqs=16,
              max_num_batched_tokens=64, kv_cache_bytes=64 << 20, verbose=False, max_loras=1, max_lora_rank=8)
    assert llm.engine.graph_capture_seconds is not None
    oracles = {None: load_base(base), **{n: peft_oracle(base, p) for n, p in adapters.items()}}
    batch = prompts(4, seed=32, lo=3, hi=60)
    for name in ("all", "qv"):
        llm.add_lora(name, adapters[name])
        names = [name, None, name, None]
        outs = llm.generate(batch, [SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, lora=n)
                                    for n in names], use_tqdm=False)
        for prompt, out, n in zip(batch, outs, names):
            assert out.token_ids == greedy_tokens(oracles[n], prompt, NEW), n
        llm.remove_lora(name)


@pytest.mark.parametrize("method,tree_width", [("ngram", 1), ("ngram", 3), ("layers", 1), ("layers", 2)])
def test_speculative_verification_with_adapters_matches_peft_on_gpu(tmp_path, method, tree_width):
    """n-gram drafts and the target's first layer (its graphs reading the draft tokens' adapters)
    verified by the adapted target, chains and token trees: PEFT's greedy tokens for each
    request's adapter."""
    base = tmp_path / "base"
    make_tiny_checkpoint("qwen3_qknorm", base, seed=8)
    adapters = {"all": str(write_peft_adapter(base, tmp_path / "all", seed=1, r=8, alpha=16))}
    llm = LLM(str(base), device="cuda", dtype="float32", block_size=16, max_model_len=256, max_num_seqs=16,
              max_num_batched_tokens=64, kv_cache_bytes=64 << 20, verbose=False, lora_modules=adapters,
              speculative_config={"method": method, "num_speculative_tokens": 4, "disable_by_cost": False,
                                  "tree_width": tree_width, **({"num_layers": 1} if method == "layers" else {})})
    batch = prompts(4, seed=33, lo=6, hi=40)
    batch[1] = batch[1][:6] * 4
    names = ["all", None, "all", None]
    outs = llm.generate(batch, [SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, lora=n) for n in names],
                        use_tqdm=False)
    oracles = {None: load_base(base), "all": peft_oracle(base, adapters["all"])}
    for prompt, out, name in zip(batch, outs, names):
        assert out.token_ids == greedy_tokens(oracles[name], prompt, NEW), name
    assert llm.engine.stats().spec.num_steps > 0
