"""Layers of compressed checkpoints: low-rank linears, 2:4 linears, the config.json entry."""

import pytest
import torch
import torch.nn.functional as F

from flashserve.compress.prune import mask_2_4
from flashserve.layers.compressed import (LowRankLinear, SemiStructuredLinear, apply_low_rank, compression_spec,
                                          is_2_4, use_semi_structured)


def test_low_rank_linear_is_two_thin_products():
    g = torch.Generator().manual_seed(0)
    m = LowRankLinear(32, 48, 8, bias=True)
    for p in m.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(5, 32, generator=g)
    torch.testing.assert_close(m(x), x @ (m.weight_b @ m.weight_a).T + m.bias)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 32\]"):
        LowRankLinear(32, 48, 33)


def test_semi_structured_linear_equals_dense_math_and_refuses_other_patterns():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    w24 = w * mask_2_4(w.abs())
    assert is_2_4(w24) and not is_2_4(w)
    layer = SemiStructuredLinear(w24, None, min_tokens=4)
    x = torch.randn(7, 64, generator=g)
    torch.testing.assert_close(layer(x), F.linear(x, w24))  # CPU: no kernel, the dense matrix
    assert layer.sparse is None
    with pytest.raises(ValueError, match="2:4 pattern"):
        SemiStructuredLinear(w, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_kernel_matches_dense_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(2)
    w = torch.randn(1024, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
    w24 = w * mask_2_4(w.abs())
    layer = SemiStructuredLinear(w24, None)
    assert layer.sparse is not None
    for rows in (8, 2048):  # decode-sized input: dense path; prefill-sized: the 2:4 kernel
        x = torch.randn(rows, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x).float(), F.linear(x, w24).float(), atol=0.5, rtol=2e-2)


def test_apply_low_rank_and_spec_errors():
    from flashserve.compress.model_io import load_source  # noqa: F401 (import check of the layer order)

    lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="not a module"):
        apply_low_rank(lin, {"nope": 2})
    with pytest.raises(ValueError, match="not a linear layer"):
        apply_low_rank(lin, {"0": 2})  # torch.nn.Linear is not a flashserve linear
    assert compression_spec({}) == {}
    with pytest.raises(ValueError, match="positive integer ranks"):
        compression_spec({"compression": {"low_rank": {"a": 0}}})
    with pytest.raises(ValueError, match="'2:4'"):
        compression_spec({"compression": {"semi_structured": "4:8"}})
    assert use_semi_structured(lin) == 0


def test_speed_bench_variants_swap_every_decoder_linear(tmp_path):
    from conftest_models import make_tiny_checkpoint
    from flashserve import LLM, SamplingParams
    from flashserve.compress.speed import lowrank_rank, to_variant
    from flashserve.layers.linear import Linear

    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=1)
    for variant in ("2:4", "lowrank-0.5"):
        llm = LLM(str(tmp_path), device="cpu", max_model_len=64, kv_cache_bytes=2 << 20, verbose=False)
        to_variant(llm.engine.model, variant)
        layer = llm.engine.model.model.layers[0]
        if variant == "2:4":
            assert all(is_2_4(m.weight) for m in layer.modules() if isinstance(m, Linear))
        else:
            qkv = layer.self_attn.qkv_proj
            assert isinstance(qkv, LowRankLinear) and qkv.rank == lowrank_rank(128 + 2 * 32, 64, 0.5) == 24
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
        assert len(out.token_ids) == 4
    with pytest.raises(ValueError, match="unknown variant"):
        to_variant(llm.engine.model, "int4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_2_4_directory_prefills_through_the_sparse_kernel_on_gpu(tmp_path):
    import random

    import transformers

    from flashserve import LLM
    from flashserve.bench.quality import compare
    from flashserve.compress.model_io import hf_state_dict, load_source, write_model_dir
    from flashserve.compress.prune import prune_model

    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "dense"), safe_serialization=True)
    src = load_source(str(tmp_path / "dense"))
    prune_model(src.model, "2:4", None, score="magnitude")
    tensors = hf_state_dict(src.model)
    write_model_dir(tmp_path / "sparse", tensors, src.config_json, None, {"semi_structured": "2:4"})
    write_model_dir(tmp_path / "zeros", tensors, src.config_json, None)  # the same weights, served dense
    kw = dict(device="cuda", dtype="bfloat16", max_model_len=2048, kv_cache_bytes=64 << 20, verbose=False)
    sparse, zeros = LLM(str(tmp_path / "sparse"), **kw).engine, LLM(str(tmp_path / "zeros"), **kw).engine
    assert sum(isinstance(m, SemiStructuredLinear) and m.sparse is not None for m in sparse.model.modules()) == 8
    ids = [random.Random(1).randrange(3, 512) for _ in range(1600)]
    rep = compare(sparse.score(ids, 2048), zeros.score(ids, 2048), ids)  # one 1599-row chunk: the 2:4 kernel
    assert rep.kl_divergence < 1e-3 and rep.top1_agreement > 0.97
