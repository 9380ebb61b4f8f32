"""Quantized models end to end on the GPU (skipped without CUDA): every weight mode, with the
Triton backend and CUDA graphs, decodes the greedy tokens of the same engine whose quantized
layers compute in dense torch ops (``PackedWeight.reference``), in fp32 so that ties cannot
flip between summation orders; in bf16 the logits stay close. GGUF files with mixed block
types run from their packed bytes."""

from __future__ import annotations

import random

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.quant.packed import PackedWeight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODES = ["int8", "int4-g32", "int4-g64-zp", "fp8", "fp8-w8a8"]


def _engine(model: str, mode: str, dtype: str, graphs: bool) -> LLM:
    return LLM(model=model, device="cuda", dtype=dtype, quantization=mode, attention_backend="triton",
               cuda_graphs=graphs, block_size=16, max_model_len=256, max_num_seqs=8, kv_cache_bytes=64 << 20,
               verbose=False)


def _use_reference(llm: LLM) -> None:
    for part in llm.engine.worker.model.modules():
        if isinstance(part, PackedWeight):
            part.forward = part.reference
            part.gemv_operands = lambda: None  # no gated GEMV either: down(silu_and_mul(h)) runs forward


def _prompts() -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(1, 40))] for _ in range(6)]


# W8A8 quantizes every layer's activations to e4m3 (3 mantissa bits): a summation-order difference
# that flips one fp8 rounding moves that value by up to 6%, and the flip propagates, so its tokens
# are not expected to equal the dense reference's; its logits are held to the KL bound below.
@pytest.mark.parametrize("mode", [m for m in MODES if m != "fp8-w8a8"])
def test_fp32_kernels_and_graphs_decode_like_the_reference(tmp_path, mode):
    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=4)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    fast = _engine(str(tmp_path), mode, "float32", graphs=True)
    assert fast.engine.worker.graphs is not None
    reference = _engine(str(tmp_path), mode, "float32", graphs=False)
    _use_reference(reference)
    got = [o.token_ids for o in fast.generate(_prompts(), params, use_tqdm=False)]
    assert got == [o.token_ids for o in reference.generate(_prompts(), params, use_tqdm=False)]


@pytest.mark.parametrize("mode", ["int8", "int4-g64-zp", "fp8"])
def test_batch1_gated_gemv_decodes_like_the_reference(tmp_path, monkeypatch, mode):
    """One request at a time: the MLPs' down projections take the gated GEMV (SiLU-and-mul done as
    it reads its input) and the tokens stay the dense reference's."""
    gated = []
    plain = PackedWeight.silu_gated

    def spy(self, h):
        y = plain(self, h)
        gated.append(y is not None)
        return y

    monkeypatch.setattr(PackedWeight, "silu_gated", spy)
    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=6, intermediate_size=512)  # K the GEMV tiles divide
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    fast = _engine(str(tmp_path), mode, "float32", graphs=True)
    reference = _engine(str(tmp_path), mode, "float32", graphs=False)
    _use_reference(reference)
    for prompt in _prompts()[:2]:
        got = fast.generate([prompt], params, use_tqdm=False)[0].token_ids
        assert got == reference.generate([prompt], params, use_tqdm=False)[0].token_ids
    assert any(gated)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_logits_close_to_the_reference(tmp_path, mode):
    from flashserve.bench.quality import compare

    make_tiny_checkpoint("qwen3_qknorm", tmp_path, seed=5)
    ids = _prompts()[0] * 4
    fast = _engine(str(tmp_path), mode, "bfloat16", graphs=False).engine
    reference = _engine(str(tmp_path), mode, "bfloat16", graphs=False)
    _use_reference(reference)
    report = compare(fast.score(ids, 32), reference.engine.score(ids, 32), ids)
    # (the tiny random model's distributions are nearly flat, so top-1 flips at tiny KL under W8A8)
    assert report.kl_divergence < 2e-3 and report.top1_agreement > (0.8 if mode == "fp8-w8a8" else 0.95), report


def test_gguf_mixed_types_on_gpu(tmp_path):
    from test_quant_gguf import MIXED, tiny_hf, write_mixed_gguf

    path = tmp_path / "m.gguf"
    oracle = write_mixed_gguf(tiny_hf("llama3_gqa", seed=2), path, MIXED)
    (tmp_path / "no_tokenizer").mkdir()  # prompts as token ids
    # (quantization="gguf": an explicit dtype alone would load the file dequantized)
    llm = LLM(model=str(path), tokenizer=str(tmp_path / "no_tokenizer"), device="cuda", dtype="float32",
              quantization="gguf", attention_backend="triton", cuda_graphs=True, max_model_len=256, max_num_seqs=4,
              kv_cache_bytes=64 << 20, verbose=False)
    labels = [p.label for p in llm.engine.worker.model.model.layers[0].self_attn.qkv_proj.packed_parts]
    assert labels == ["gguf-Q4_K", "gguf-Q6_K"]  # the file's blocks on the GPU, both types
    prompt = _prompts()[1]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    ids = torch.tensor([prompt], device="cuda")
    oracle = oracle.cuda()
    with torch.no_grad():
        for _ in range(16):
            ids = torch.cat([ids, oracle(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.token_ids == ids[0, len(prompt):].tolist()
