"""The dense batch-1 GEMV inside a bf16 model on the GPU (skipped without CUDA): a decode step's
linear layers and LM head take it (also inside CUDA graphs, launched with PDL), each layer's
result stays within bf16 rounding of ``F.linear``, the gated down projection gives the bits of
SiLU-and-mul then the product, and one-request decoding gives the tokens of the same engine with
the GEMV switched off, up to a bf16 near-tie."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams
from flashserve.kernels import dense_gemv as dense_gemv_module
from flashserve.kernels.activation import silu_and_mul
from flashserve.layers.linear import Linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# widths the GEMV's tiles divide: qkv 768 x 512, o 512 x 512, gate/up 2048 x 512, down 512 x 1024, head 512 x 512
SHAPES = dict(hidden_size=512, intermediate_size=1024, head_dim=64)


def _engine(path: str) -> LLM:
    return LLM(model=path, device="cuda", dtype="bfloat16", attention_backend="triton", cuda_graphs=True,
               block_size=16, max_model_len=256, max_num_seqs=4, kv_cache_bytes=64 << 20, verbose=False)


def test_decode_layers_take_the_dense_gemv(tmp_path, monkeypatch):
    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=7, **SHAPES)
    calls = []
    plain = dense_gemv_module.dense_gemv

    def spy(x, w, bias=None, gated=False, config=None):
        y = plain(x, w, bias, gated, config)
        calls.append((tuple(w.shape), gated, y is not None))
        return y

    monkeypatch.setattr(dense_gemv_module, "dense_gemv", spy)
    llm = _engine(str(tmp_path))
    prompt = [random.Random(1).randrange(3, 512) for _ in range(20)]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 16
    taken = {(shape, gated) for shape, gated, ran in calls if ran}
    assert {((768, 512), False), ((512, 512), False), ((2048, 512), False), ((512, 1024), True)} <= taken

    model = llm.engine.worker.model
    torch.manual_seed(0)
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear):
            continue
        x = torch.randn(1, layer.in_features, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x).float(), F.linear(x, layer.weight).float(), rtol=2e-2, atol=2e-2,
                                   msg=name)
        if name.endswith("down_proj"):
            h = torch.randn(1, 2 * layer.in_features, device="cuda", dtype=torch.bfloat16)
            assert torch.equal(layer.forward_silu_gated(h), layer(silu_and_mul(h))), name


def test_one_request_decodes_like_the_cublas_engine(tmp_path, monkeypatch):
    """Greedy tokens equal those of the engine without the GEMV until a near-tie: where the two
    first differ, the reference ranked the GEMV engine's token within 0.1 nats of its own (bf16
    products summed in another order move the logits of a random tiny model by about that)."""
    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=8, **SHAPES)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(4, 40))] for _ in range(3)]
    got = [_engine(str(tmp_path)).generate([p], params, use_tqdm=False)[0].outputs[0] for p in prompts]
    monkeypatch.setattr("flashserve.quant.base._dense_gemv", lambda *args, **kwargs: None)
    reference = _engine(str(tmp_path))
    want = [reference.generate([p], params, use_tqdm=False)[0].outputs[0] for p in prompts]
    for g, w in zip(got, want):
        assert len(g.token_ids) == len(w.token_ids) == 24
        first = next((i for i, (a, b) in enumerate(zip(g.token_ids, w.token_ids)) if a != b), None)
        if first is None:
            continue
        top = dict(w.logprobs[first][2])  # the reference's five best at the first difference
        assert g.token_ids[first] in top, (first, g.token_ids[first], top)
        assert top[w.token_ids[first]] - top[g.token_ids[first]] < 0.1, (first, top)
