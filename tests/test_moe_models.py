"""Mixtral, Qwen2-MoE (shared expert) and Qwen3-MoE against transformers on tiny random checkpoints.

Per architecture: prefill logits within fp32 tolerance, and greedy decoding through the whole
engine (paged KV, chunked prefill, batching) equal to transformers' greedy continuation for 24+
tokens, for 1 and 8 prompts. Also: checkpoints with stacked expert tensors, a missing expert
tensor and a top-k larger than the number of experts are refused with clear errors; int8 / fp8
experts end to end (KL against fp32), int4 experts refused.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest_models import _COMMON, PagedKVCache, _randomize
from flashserve import LLM, SamplingParams
from flashserve.layers.attention import TorchAttentionBackend
from flashserve.layers.moe import MoEMLP, route
from flashserve.loader import load_model
from test_model_vs_hf import _all_logits

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

# name -> (config class, model class, config kwargs); tiny shapes, routing that uses every expert
TINY_MOE: dict[str, tuple[str, str, dict]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                     sliding_window=None, tie_word_embeddings=False)),
    # shared expert, a dense layer (mlp_only_layers), top-k weights not renormalised
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=96, norm_topk_prob=False,
                       mlp_only_layers=[1], num_hidden_layers=3, use_sliding_window=False,
                       tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_attention_heads=8, num_key_value_heads=2, num_experts=8, num_experts_per_tok=3,
                       moe_intermediate_size=32, norm_topk_prob=True, use_sliding_window=False,
                       tie_word_embeddings=False, rope_theta=1_000_000.0)),
}


def make_tiny_moe(arch: str, folder: Path, seed: int = 0) -> torch.nn.Module:
    import transformers

    config_cls, model_cls, extra = TINY_MOE[arch]
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    _randomize(model, seed)
    model = model.float().eval()
    model.config._attn_implementation = "eager"
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {arch: (str(folder), make_tiny_moe(arch, folder, seed=i + 3))
            for i, arch in enumerate(TINY_MOE) for folder in [tmp_path_factory.mktemp(arch)]}


def prompts(n: int, seed: int, lo: int = 3, hi: int = 40, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@torch.no_grad()
def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation (its KV cache), EOS allowed like any token."""
    dev = hf.device
    out = hf.generate(torch.tensor([prompt], device=dev),
                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=dev), max_new_tokens=n,
                      min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", list(TINY_MOE))
def test_prefill_logits_match_transformers(checkpoints, arch):
    folder, hf = checkpoints[arch]
    model, config = load_model(folder, "auto", torch.float32, "cpu", TorchAttentionBackend())
    assert config.architecture == arch
    assert sum(isinstance(m, MoEMLP) for m in model.modules()) == 2  # qwen2_moe: layer 1 is dense
    ids = prompts(1, seed=5, lo=30, hi=30)[0]
    ours = _all_logits(model, PagedKVCache(config, num_blocks=32, block_size=4), [(0, ids)])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", list(TINY_MOE))
def test_greedy_engine_matches_transformers_one_and_eight_prompts(checkpoints, arch):
    folder, hf = checkpoints[arch]
    llm = LLM(model=folder, device="cpu", block_size=4, max_model_len=256, kv_cache_bytes=8 << 20,
              max_num_batched_tokens=48, verbose=False)  # long prompts are chunked
    batch = prompts(8, seed=len(arch), hi=70)
    outs = llm.generate(batch, GREEDY, use_tqdm=False)
    for p, o in zip(batch, outs):
        assert o.token_ids == hf_greedy(hf, p, 24)
    single = llm.generate([batch[2]], GREEDY, use_tqdm=False)[0]
    assert single.token_ids == outs[2].token_ids


def test_stacked_expert_tensors_load(checkpoints, tmp_path):
    """The same weights saved as stacked [E, 2I, H] / [E, H, I] tensors give the same model."""
    folder, _ = checkpoints["qwen3_moe"]
    tensors = load_file(str(Path(folder) / "model.safetensors"))
    if not any(".experts.0." in k for k in tensors):
        pytest.skip("this transformers already saves stacked experts")
    stacked: dict[str, torch.Tensor] = {}
    for layer in range(_COMMON["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts"
        n = TINY_MOE["qwen3_moe"][2]["num_experts"]
        stacked[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([tensors.pop(f"{p}.{e}.gate_proj.weight"), tensors.pop(f"{p}.{e}.up_proj.weight")])
             for e in range(n)])
        stacked[f"{p}.down_proj"] = torch.stack([tensors.pop(f"{p}.{e}.down_proj.weight") for e in range(n)])
    save_file({**tensors, **stacked}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((Path(folder) / "config.json").read_text())
    a, _ = load_model(folder, "auto", torch.float32, "cpu", TorchAttentionBackend())
    b, _ = load_model(str(tmp_path), "auto", torch.float32, "cpu", TorchAttentionBackend())
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_missing_expert_weight_is_named(checkpoints, tmp_path):
    folder, _ = checkpoints["mixtral"]
    tensors = load_file(str(Path(folder) / "model.safetensors"))
    dropped = [k for k in tensors if ".experts.3." in k and "layers.1." in k and ("w3" in k or "up_proj" in k)]
    if not dropped:
        pytest.skip("this transformers saves stacked experts")
    for k in dropped:
        del tensors[k]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((Path(folder) / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing weights for: model\.layers\.1\.mlp\.experts\.gate_up_proj:\(3, 1\)"):
        load_model(str(tmp_path), "auto", torch.float32, "cpu", TorchAttentionBackend())


def test_top_k_larger_than_experts_is_refused(checkpoints, tmp_path):
    folder, _ = checkpoints["qwen3_moe"]
    cfg = json.loads((Path(folder) / "config.json").read_text())
    cfg["num_experts_per_tok"] = 9  # of 8 experts
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    msg = r"num_experts_per_tok \(top-k\) must be between 1 and num_experts \(8\), got 9"
    with pytest.raises(ValueError, match=msg):
        load_model(str(tmp_path), "dummy", torch.float32, "cpu", TorchAttentionBackend())
    with pytest.raises(ValueError, match=r"top-k must be between 1 and the number of experts \(4\), got 5"):
        route(torch.randn(3, 4), 5)


def _log_probs(folder: str, ids: list[int], **kw) -> list[torch.Tensor]:
    llm = LLM(model=folder, device="cpu", block_size=4, max_model_len=256, kv_cache_bytes=8 << 20, verbose=False, **kw)
    try:
        return list(llm.engine.score(ids, chunk_size=32))
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_experts_end_to_end(checkpoints, mode):
    """``quantization="int8" | "fp8"`` quantizes the experts too (8-bit values and per-row scales
    in the layer), and the model stays close to fp32: KL and top-1 agreement over 96 tokens, as
    the quantization tests measure (bounds about 5x the measured KL: 0.00008 int8, 0.001 fp8, attention
    and LM head quantized too; top-1 0.99 / 0.87)."""
    from flashserve.bench.quality import compare

    folder, _ = checkpoints["qwen2_moe"]
    model, _ = load_model(folder, "auto", torch.float32, "cpu", TorchAttentionBackend(), quantization=mode)
    experts = [m.experts for m in model.modules() if isinstance(m, MoEMLP)]
    assert experts and all("gate_up_proj" not in dict(e.named_parameters()) for e in experts)
    assert all(m.gate.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, MoEMLP))  # dense router
    w13, w2, s13, s2 = experts[0].tensors()
    assert w13.dtype == w2.dtype == (torch.int8 if mode == "int8" else torch.float8_e4m3fn)
    assert s13.shape == w13.shape[:2] and s2.shape == w2.shape[:2]
    ids = prompts(1, seed=8, lo=96, hi=96)[0]
    report = compare(_log_probs(folder, ids, quantization=mode), _log_probs(folder, ids), ids)
    # a random tiny model's distributions are nearly flat, so top-1 flips easily; KL is the measure
    limit = 0.0005 if mode == "int8" else 0.005
    assert report.kl_divergence < limit and report.top1_agreement > 0.75, report


def test_pruned_moe_checkpoint_takes_quantized_experts(checkpoints, tmp_path):
    """A 2:4-pruned MoE checkpoint (what ``flashserve compress prune --method 2:4`` writes)
    loaded with ``quantization="int8"``: its experts are stored 8-bit (experts are never pruned,
    so they take the quantization's expert format) and it stays close to its dense load."""
    from flashserve.bench.quality import compare
    from flashserve.compress.model_io import hf_state_dict, load_source, write_model_dir
    from flashserve.compress.prune import prune_model

    src = load_source(checkpoints["qwen2_moe"][0])
    prune_model(src.model, "2:4", None, prompts(4, seed=1, lo=32, hi=32))
    write_model_dir(tmp_path / "p", hf_state_dict(src.model), src.config_json, None, {"semi_structured": "2:4"})
    folder = str(tmp_path / "p")
    model, _ = load_model(folder, "auto", torch.float32, "cpu", TorchAttentionBackend(), quantization="int8")
    w13, w2, _, _ = next(m.experts for m in model.modules() if isinstance(m, MoEMLP)).tensors()
    assert w13.dtype == w2.dtype == torch.int8
    ids = prompts(1, seed=8, lo=64, hi=64)[0]
    report = compare(_log_probs(folder, ids, quantization="int8"), _log_probs(folder, ids), ids)
    assert report.kl_divergence < 0.0005 and report.top1_agreement > 0.75, report


def test_int4_experts_are_refused(checkpoints):
    folder, _ = checkpoints["qwen3_moe"]
    with pytest.raises(ValueError, match=r"int4 experts are not implemented \(quantization='int4-g32'\)"):
        load_model(folder, "auto", torch.float32, "cpu", TorchAttentionBackend(), quantization="int4-g32")


def test_routing_softmax_sigmoid_renormalisation():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    w, ids = route(logits, 2, "softmax", renormalize=False)
    p = logits.softmax(-1)[0]
    assert ids.tolist() == [[0, 2]] and torch.allclose(w[0], p[[0, 2]])
    w, _ = route(logits, 2, "softmax", renormalize=True)
    assert torch.allclose(w.sum(-1), torch.ones(1))
    w, ids = route(logits, 2, "sigmoid", renormalize=False)
    assert torch.allclose(w[0], logits.sigmoid()[0, [0, 2]])


@pytest.mark.parametrize("name,arch,gb,active_gb", [("qwen3-30b-a3b", "qwen3_moe", 61.1, 6.08),
                                                     ("mixtral-8x7b", "mixtral", 93.4, 25.5)])
def test_bundled_dummy_configs(name, arch, gb, active_gb):
    """The bundled configs build (on the meta device) with the published sizes: bf16 bytes of all
    weights, and the bytes one decoded token reads (k experts per layer, attention, LM head)."""
    from flashserve.bench.latency import weight_bytes

    model, config = load_model(name, "dummy", torch.bfloat16, "meta", TorchAttentionBackend())
    assert config.architecture == arch and all(config.layer_spec(i).mlp == "moe" for i in range(config.num_layers))
    assert sum(p.numel() * 2 for p in model.parameters()) / 1e9 == pytest.approx(gb, abs=0.1)
    assert weight_bytes(model) / 1e9 == pytest.approx(active_gb, abs=0.05)


_GGUF_MOE = {"mlp.gate": "ffn_gate_inp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
             "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
             "mlp.shared_expert.down_proj": "ffn_down_shexp"}


@torch.no_grad()
def write_moe_gguf(hf: torch.nn.Module, path: Path, q8_0: bool = False, per_expert: bool = False) -> None:
    """``hf`` as an F32 GGUF file with llama.cpp's MoE names: router ``ffn_gate_inp``, experts
    stacked ``ffn_{gate,up,down}_exps`` [E, out, in], shared expert ``*_shexp``; Mixtral as
    architecture "llama" with q/k rows permuted. ``q8_0``: the layers' projection matrices and
    experts and routers in Q8_0 blocks (gguf-py's quantizer), the rest F32. ``per_expert``: the
    first llama.cpp Mixtral layout, one ``ffn_{gate,up,down}.J`` tensor per expert."""
    import gguf
    import numpy as np

    from conftest_models import _GGUF_LAYER, _llamacpp_permute

    cfg = hf.config
    arch = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[cfg.model_type]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_expert_count(getattr(cfg, "num_local_experts", None) or cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch != "llama":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}

    def add(gguf_name: str, t: torch.Tensor) -> None:
        if per_expert and gguf_name.endswith("_exps.weight"):
            for j, part in enumerate(t):
                add(gguf_name.replace("_exps.weight", f".{j}.weight"), part)
            return
        if not (q8_0 and t.ndim >= 2 and t.shape[-1] % 32 == 0):
            w.add_tensor(gguf_name, np.ascontiguousarray(t.numpy()))
            return
        q = gguf.quants.quantize(np.ascontiguousarray(t.reshape(-1, t.shape[-1]).numpy()), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(gguf_name, q.reshape(*t.shape[:-1], -1), raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    for name, p in hf.named_parameters():
        t = p.detach().float()
        if name in globals_:
            w.add_tensor(globals_[name], np.ascontiguousarray(t.numpy()))
            continue
        parts = name.split(".")
        layer, module, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
        if module == "mlp.experts":  # transformers' stacked parameters
            if kind == "gate_up_proj":
                gate, up = t.chunk(2, dim=1)
                add(f"blk.{layer}.ffn_gate_exps.weight", gate)
                add(f"blk.{layer}.ffn_up_exps.weight", up)
            else:
                add(f"blk.{layer}.ffn_down_exps.weight", t)
            continue
        if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
            t = _llamacpp_permute(t, cfg.num_attention_heads if "q_proj" in module else cfg.num_key_value_heads)
        gguf_module = _GGUF_MOE.get(module) or _GGUF_LAYER[module]
        add(f"blk.{layer}.{gguf_module}.{kind}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", list(TINY_MOE))
def test_gguf_moe_matches_transformers(checkpoints, arch, tmp_path):
    folder, hf = checkpoints[arch]
    path = tmp_path / f"{arch}.gguf"
    write_moe_gguf(hf, path)
    # 'auto' keeps a GGUF file's blocks packed but dequantizes its experts: the same model here (F32)
    model, config = load_model(str(path), "gguf", torch.float32, "cpu", TorchAttentionBackend(), quantization="auto")
    assert config.architecture == arch and config.layer_types == load_model(
        folder, "auto", torch.float32, "meta", TorchAttentionBackend())[1].layer_types
    ids = prompts(1, seed=6, lo=20, hi=20)[0]
    ours = _all_logits(model, PagedKVCache(config, num_blocks=32, block_size=4), [(0, ids)])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("q8_0", [False, True])
def test_gguf_with_one_tensor_per_expert_loads_like_the_stacked_layout(checkpoints, tmp_path, q8_0):
    """llama.cpp's first Mixtral files name each expert's matrices ``blk.N.ffn_gate.J.weight``: they
    load to the same model as the stacked ``ffn_gate_exps`` layout (F32: transformers' logits)."""
    _, hf = checkpoints["mixtral"]
    old, new = tmp_path / "per_expert.gguf", tmp_path / "stacked.gguf"
    write_moe_gguf(hf, old, q8_0=q8_0, per_expert=True)
    write_moe_gguf(hf, new, q8_0=q8_0)
    a, config = load_model(str(old), "gguf", torch.float32, "cpu", TorchAttentionBackend(), quantization="auto")
    b, _ = load_model(str(new), "gguf", torch.float32, "cpu", TorchAttentionBackend(), quantization="auto")
    assert config.architecture == "mixtral"
    for ma, mb in zip([m for m in a.modules() if isinstance(m, MoEMLP)],
                      [m for m in b.modules() if isinstance(m, MoEMLP)], strict=True):
        assert all(x is y is None or torch.equal(x, y)
                   for x, y in zip(ma.experts.tensors(), mb.experts.tensors(), strict=True))
    if not q8_0:
        ids = prompts(1, seed=8, lo=16, hi=16)[0]
        ours = _all_logits(a, PagedKVCache(config, num_blocks=32, block_size=4), [(0, ids)])[0]
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_q8_0_gguf_moe_keeps_blocks_packed_and_experts_dense(checkpoints, tmp_path):
    """A Q8_0 GGUF MoE file under the default ``auto``: attention blocks stay packed, experts and
    routers are dequantized at load to the same values as under ``none``, and the logits follow."""
    from flashserve.quant.packed import PackedWeight

    _, hf = checkpoints["qwen3_moe"]
    path = tmp_path / "q8_0.gguf"
    write_moe_gguf(hf, path, q8_0=True)
    packed, config = load_model(str(path), "gguf", torch.float32, "cpu", TorchAttentionBackend(), quantization="auto")
    dense, _ = load_model(str(path), "gguf", torch.float32, "cpu", TorchAttentionBackend(), quantization="none")
    assert any(isinstance(m, PackedWeight) for m in packed.model.layers[0].self_attn.modules())
    for ma, mb in zip([m for m in packed.modules() if isinstance(m, MoEMLP)],
                      [m for m in dense.modules() if isinstance(m, MoEMLP)], strict=True):
        a, b = ma.experts.tensors(), mb.experts.tensors()
        assert a[0].dtype == torch.float32 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(ma.gate.weight, mb.gate.weight)
    ids = prompts(1, seed=7, lo=20, hi=20)[0]
    got = _all_logits(packed, PagedKVCache(config, num_blocks=32, block_size=4), [(0, ids)])[0]
    ref = _all_logits(dense, PagedKVCache(config, num_blocks=32, block_size=4), [(0, ids)])[0]
    # the CPU's packed kernels take bf16 activations: close, not equal
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
