"""Online quantization of dense checkpoints (int8, int4 with and without zero points, fp8
weight-only and W8A8) on tiny models: the quantized model computes what a dense model holding
the same quantized weights computes; every bad option fails before anything is allocated."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest_models import PagedKVCache, make_tiny_checkpoint
from flashserve.config import EngineConfig
from flashserve.kernels import quant_reference as ref
from flashserve.layers.attention import TorchAttentionBackend
from flashserve.quant.config import QUANTIZATION_MODES, fp8_support_error
from flashserve.quant.packed import PackedWeight

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _load(folder, mode: str, fmt: str = "auto"):
    from flashserve.loader import load_model

    return load_model(str(folder), fmt, torch.float32, torch.device("cpu"), TorchAttentionBackend(), quantization=mode)


def _dequantized(w: torch.Tensor, mode: str) -> torch.Tensor:
    """What the reference quantizers make of a dense weight, back in fp32."""
    if mode == "int8":
        return ref.dequantize_int8(*ref.quantize_int8(w))
    if mode.startswith("fp8"):
        return ref.dequantize_fp8(*ref.quantize_fp8(w))
    group, zp = int(mode.split("-g")[1].split("-")[0]), mode.endswith("-zp")
    u, s, z = ref.quantize_int4(w, group, zp)
    return ref.dequantize_int4(ref.pack_int4(u), s, z if zp else None, group)


def _oracle(hf: torch.nn.Module, mode: str) -> torch.nn.Module:
    """The HF model with every linear weight and the LM head replaced by their quantized values
    (a tied head gets its own int8 copy; the embedding stays dense)."""
    oracle = copy.deepcopy(hf)
    head = "int8"
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if any(f".{lin}." in name for lin in LINEARS) and name.endswith(".weight"):
                p.copy_(_dequantized(p, mode))
        if oracle.config.tie_word_embeddings:
            oracle.lm_head.weight = torch.nn.Parameter(_dequantized(oracle.lm_head.weight.detach(), head))
        else:
            oracle.lm_head.weight.copy_(_dequantized(oracle.lm_head.weight, head))
    return oracle


def _logits(model, config, ids):
    return PagedKVCache(config, num_blocks=16, block_size=4).step(model, [(0, ids)])[0]


@pytest.mark.parametrize("arch,mode", [
    ("llama3_gqa", "int8"),
    ("llama_mha_tied", "int8"),  # tied head: quantized copy, dense embedding
    ("llama3_gqa", "int4-g32"),
    ("qwen2_bias", "int4-g64-zp"),
    ("qwen3_qknorm", "fp8"),
    ("llama3_gqa", "fp8-w8a8"),
])
def test_online_quantized_model_matches_dense_model_with_quantized_weights(tmp_path, arch, mode):
    hf = make_tiny_checkpoint(arch, tmp_path, seed=7)
    model, config = _load(tmp_path, mode)
    assert model.model.layers[1].mlp.down_proj.quant_method.label == mode
    assert model.lm_head.quant_method.label == "int8"
    assert model.model.embed_tokens.quant_method.label == "dense"
    ids = torch.randint(3, config.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = _logits(model, config, ids)
    with torch.no_grad():
        expect = _oracle(hf, mode)(torch.tensor([ids])).logits[0, -1]
        plain = hf(torch.tensor([ids])).logits[0, -1]
    # int8 / int4 (and every int8 LM head) on the CPU take bf16 activations; fp8 is emulated in fp32;
    # W8A8 also rounds every activation to fp8 (3 mantissa bits), which the dense oracle does not
    bound = {"int8": 0.02, "int4-g32": 0.02, "int4-g64-zp": 0.02, "fp8": 0.02, "fp8-w8a8": 0.15}[mode]
    assert (ours - expect).abs().max() <= bound * expect.abs().max()
    assert (ours - plain).abs().max() > 1e-5  # the weights really were quantized
    for part in model.modules():  # the same arithmetic in dense torch ops (another summation order)
        if isinstance(part, PackedWeight):
            part.forward = part.reference
    torch.testing.assert_close(_logits(model, config, ids), ours, atol=0.01 * ours.abs().max().item(), rtol=0)


def test_online_quantization_of_dummy_weights(tmp_path):
    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=1)
    model, config = _load(tmp_path, "int4", fmt="dummy")
    # "int4": symmetric, group 128 if it divides every layer (here 64 does not take 128)
    assert model.model.layers[0].self_attn.qkv_proj.quant_method.label == "int4-g64"
    assert torch.isfinite(_logits(model, config, [5, 6, 7])).all()


def test_bad_options_fail_before_allocation(tmp_path, monkeypatch):
    import flashserve.loader as loader

    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=1)

    def no_allocation(*args, **kwargs):
        raise AssertionError("the model was allocated before the error")

    monkeypatch.setattr(loader, "build_model", no_allocation)
    with pytest.raises(ValueError, match=r"group size 128 does not divide in_features 64 .*: 32, 64"):
        _load(tmp_path, "int4-g128")
    with pytest.raises(ValueError, match="quantization must be one of auto, none, gguf"):
        _load(tmp_path, "int3")
    with pytest.raises(ValueError, match="quantization must be one of auto, none, gguf"):
        EngineConfig(quantization="int3")
    with pytest.raises(ValueError, match="needs a .gguf file"):
        _load(tmp_path, "gguf")
    with pytest.raises(ValueError, match="declares quantization_config.quant_method='gptq'"):
        _load(tmp_path, "gptq")
    assert "fp8-w8a8" in QUANTIZATION_MODES


def test_fp8_needs_a_gpu_with_fp8():
    cuda = torch.device("cuda:0")
    msg = fp8_support_error(cuda, (8, 0), "NVIDIA A100")
    assert "compute capability 8.9 or newer" in msg and "NVIDIA A100 has compute capability 8.0" in msg
    assert fp8_support_error(cuda, (9, 0)) is None and fp8_support_error(cuda, (8, 9)) is None
    assert fp8_support_error(torch.device("cpu"), None) is None  # emulated on the CPU
    assert "not supported" in fp8_support_error(torch.device("mps"), None)


def test_engine_and_cli_take_the_option(tmp_path):
    import subprocess
    import sys

    from flashserve import LLM, SamplingParams

    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=2)
    llm = LLM(model=str(tmp_path), device="cpu", quantization="int8", max_model_len=64, kv_cache_bytes=1 << 20,
              verbose=False)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 4
    r = subprocess.run([sys.executable, "-m", "flashserve.cli", "generate", "hi", "--model", str(tmp_path),
                        "--device", "cpu", "--quantization", "int3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--quantization: invalid choice: 'int3'" in r.stderr


def test_weight_bytes_counts_what_decoding_reads(tmp_path):
    from flashserve.quant import weight_bytes

    make_tiny_checkpoint("llama3_gqa", tmp_path, seed=3)
    dense, config = _load(tmp_path, "none")
    params = sum(p.numel() * p.element_size() for p in dense.parameters())
    emb = dense.model.embed_tokens.weight
    assert weight_bytes(dense) == params - emb.numel() * emb.element_size()  # untied: the table is not read
    int4, _ = _load(tmp_path, "int4-g32")
    head = config.vocab_size * config.hidden_size  # int8 head: 1 byte per weight + a bf16 scale per row
    assert weight_bytes(int4) < weight_bytes(dense) / 3 and weight_bytes(int4) > head
