"""Layers of compressed checkpoints: the low-rank and 2:4 linear methods, the config.json entry."""

import pytest
import torch
import torch.nn.functional as F

from flashserve.compress.layers import (CompressionConfig, LowRankMethod, SemiStructuredMethod, compression_quant_config,
                                        compression_spec, is_2_4, is_low_rank, set_low_rank, set_semi_structured)
from flashserve.compress.prune import mask_2_4
from flashserve.layers.linear import Linear, QKVLinear
from flashserve.quant import QuantConfig, quant_scope


def _fill(module, seed):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))


def test_low_rank_method_is_two_thin_products():
    spec = {"low_rank": {"l.qkv_proj": 8}}
    with quant_scope(CompressionConfig(spec, QuantConfig())):
        m = QKVLinear(32, 8, 4, 2, bias=True, prefix="l.qkv_proj")  # out 64
        dense = Linear(32, 48, prefix="l.o_proj")
    assert is_low_rank(m) and m.weight_a.shape == (8, 32) and m.weight_b.shape == (64, 8) and not hasattr(m, "weight")
    assert type(dense.quant_method).__name__ == "LinearMethod"
    _fill(m, 0)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m(x), x @ (m.weight_b @ m.weight_a).T + m.bias)
    with pytest.raises(ValueError, match=r"l.o_proj: rank must be in \[1, 32\]"):
        with quant_scope(CompressionConfig({"low_rank": {"l.o_proj": 33}}, QuantConfig())):
            Linear(32, 48, prefix="l.o_proj")


def test_set_low_rank_and_set_semi_structured_change_a_loaded_layer_in_place():
    lin = Linear(64, 16, bias=True, prefix="model.layers.0.mlp.down_proj")
    _fill(lin, 2)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    a, b = torch.randn(4, 64), torch.randn(16, 4)
    with pytest.raises(ValueError, match="do not make a 16x64"):
        set_low_rank(lin, a, b.T)
    set_low_rank(lin, a, b)
    torch.testing.assert_close(lin(x), x @ (b @ a).T + lin.bias)
    with pytest.raises(ValueError, match="not a dense flashserve linear"):
        set_low_rank(lin, a, b)  # already factorised
    sparse = Linear(64, 16, prefix="model.layers.0.mlp.down_proj")
    _fill(sparse, 4)
    with pytest.raises(ValueError, match="does not hold the pattern"):
        set_semi_structured(sparse)
    w24 = sparse.weight.data * mask_2_4(sparse.weight.data.abs())
    sparse.weight.data.copy_(w24)
    assert is_2_4(w24) and not set_semi_structured(sparse)  # CPU: no kernel, the dense matrix
    assert isinstance(sparse.quant_method, SemiStructuredMethod)
    torch.testing.assert_close(sparse(x), F.linear(x, w24))


def test_compression_config_and_spec_errors():
    inner = QuantConfig()
    assert compression_quant_config({}, inner) is inner
    cfg = compression_quant_config({"compression": {"semi_structured": "2:4", "low_rank": {"model.layers.0.x": 2}}}, inner)
    assert isinstance(cfg, CompressionConfig)
    with quant_scope(cfg):
        head = Linear(8, 8, prefix="lm_head")
        mlp = Linear(8, 8, prefix="model.layers.1.mlp.down_proj")
        lr = Linear(8, 8, prefix="model.layers.0.x")
    assert type(head.quant_method).__name__ == "LinearMethod"  # the head is not pruned
    assert isinstance(mlp.quant_method, SemiStructuredMethod) and isinstance(lr.quant_method, LowRankMethod)
    assert compression_spec({}) == {}
    with pytest.raises(ValueError, match="positive integer ranks"):
        compression_spec({"compression": {"low_rank": {"a": 0}}})
    with pytest.raises(ValueError, match="'2:4'"):
        compression_spec({"compression": {"semi_structured": "4:8"}})

    class Int8(QuantConfig):
        name = "int8"

    with pytest.raises(ValueError, match="quantization 'int8' of a low-rank checkpoint is not supported"):
        with quant_scope(CompressionConfig({"low_rank": {"model.layers.0.x": 2}}, Int8())):
            Linear(8, 8, prefix="model.layers.0.x")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_kernel_matches_dense_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(2)
    with torch.device("cuda"):
        layer = Linear(2048, 1024, prefix="model.layers.0.mlp.down_proj").to(torch.bfloat16)
    w = torch.randn(1024, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
    w24 = w * mask_2_4(w.abs())
    layer.weight.data.copy_(w24)
    assert not set_semi_structured(layer)  # served dense unless a row threshold is given
    assert set_semi_structured(layer, 1024)
    for rows in (8, 2048):  # decode-sized input: dense path; prefill-sized: the 2:4 kernel
        x = torch.randn(rows, 2048, device="cuda", generator=g, dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x).float(), F.linear(x, w24).float(), atol=0.5, rtol=2e-2)


def test_speed_bench_variants_change_every_decoder_linear(tmp_path):
    from conftest_models import make_tiny_checkpoint
    from flashserve import LLM, SamplingParams
    from flashserve.compress.speed import lowrank_rank, to_variant

    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=1)
    for variant in ("2:4", "lowrank-0.5"):
        llm = LLM(str(tmp_path), device="cpu", max_model_len=64, kv_cache_bytes=2 << 20, verbose=False)
        model = llm.engine.worker.model
        to_variant(model, variant)
        layer = model.model.layers[0]
        if variant == "2:4":
            assert all(is_2_4(m.weight) and isinstance(m.quant_method, SemiStructuredMethod)
                       for m in layer.modules() if isinstance(m, Linear))
        else:
            qkv = layer.self_attn.qkv_proj
            assert is_low_rank(qkv) and qkv.weight_a.shape[0] == lowrank_rank(128 + 2 * 32, 64, 0.5) == 24
        out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
        assert len(out.token_ids) == 4
    with pytest.raises(ValueError, match="unknown variant"):
        to_variant(model, "int4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_2_4_directory_prefills_through_the_sparse_kernel_on_gpu(tmp_path, monkeypatch):
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
    plain = LLM(str(tmp_path / "sparse"), **kw).engine  # the loader's default: no sparse copy
    assert not any(getattr(m, "sparse", None) is not None for m in plain.worker.model.modules())
    del plain
    import flashserve.compress.layers as compress_layers

    monkeypatch.setattr(compress_layers, "SEMI_STRUCTURED_MIN_TOKENS", 1024)
    sparse, zeros = LLM(str(tmp_path / "sparse"), **kw).engine, LLM(str(tmp_path / "zeros"), **kw).engine
    assert sum(getattr(m, "sparse", None) is not None for m in sparse.worker.model.modules()) == 8
    ids = [random.Random(1).randrange(3, 512) for _ in range(1600)]
    rep = compare(sparse.score(ids, 2048), zeros.score(ids, 2048), ids)  # one 1599-row chunk: the 2:4 kernel
    assert rep.kl_divergence < 1e-3 and rep.top1_agreement > 0.97
