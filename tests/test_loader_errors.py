"""Loader error paths and bundled configs: every bad input gives a clear, named error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest_models import make_tiny_checkpoint, write_tiny_gguf
from flashserve.config import AttentionSpec
from flashserve.layers.attention import TorchAttentionBackend, get_attention_backend
from flashserve.loader import bundled_config_names, load_model, load_model_config, load_tokenizer
from flashserve.loader.hf_config import model_config_from_hf

BACKEND = TorchAttentionBackend()


def _load(source, fmt="auto", device="cpu", **kw):
    return load_model(str(source), fmt, torch.float32, torch.device(device), BACKEND, **kw)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoint("llama_mha_tied", folder)
    return folder


def _copy_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unknown_architecture(tiny_dir, tmp_path):
    folder = _copy_config(tiny_dir, tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
    shutil.copy(tiny_dir / "model.safetensors", folder)
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        _load(folder)


def test_missing_path_and_missing_config(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        _load(tmp_path / "nope")
    folder = tmp_path / "noconfig"
    folder.mkdir()
    shutil.copy(tiny_dir / "model.safetensors", folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        _load(folder)


def test_missing_weights(tiny_dir, tmp_path):
    folder = _copy_config(tiny_dir, tmp_path / "noweights")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        _load(folder, "safetensors")


def test_missing_shard(tiny_dir, tmp_path):
    folder = _copy_config(tiny_dir, tmp_path / "sharded")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        _load(folder)


def test_pickle_refused(tiny_dir, tmp_path):
    folder = _copy_config(tiny_dir, tmp_path / "pickle")
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ValueError, match="pickle"):
        _load(folder)


def test_truncated_safetensors(tiny_dir, tmp_path):
    folder = _copy_config(tiny_dir, tmp_path / "truncated")
    data = (tiny_dir / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        _load(folder)


def test_garbage_safetensors(tiny_dir, tmp_path):
    folder = _copy_config(tiny_dir, tmp_path / "garbage")
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="model.safetensors"):
        _load(folder)


def test_corrupt_config_json(tiny_dir, tmp_path):
    folder = tmp_path / "badjson"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    shutil.copy(tiny_dir / "model.safetensors", folder)
    with pytest.raises(ValueError, match="config.json"):
        _load(folder)


def test_missing_tensor_reported(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy_config(tiny_dir, tmp_path / "partial")
    tensors = load_file(str(tiny_dir / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight:k"):
        _load(folder)


def test_gguf_missing_and_truncated(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        _load(tmp_path / "missing.gguf", "gguf")
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    good = tmp_path / "good.gguf"
    write_tiny_gguf(hf, good, "Q8_0")
    data = good.read_bytes()
    for cut in (16, len(data) // 3, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=bad.name):
            _load(bad)
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello, this is not a GGUF file at all")
    with pytest.raises(ValueError, match="text.gguf"):
        _load(not_gguf)


def test_sliding_window_configs_become_layer_specs():
    cfg = {
        "architectures": ["MistralForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
    }
    config = model_config_from_hf(cfg)
    assert config.sliding_window == 4096
    assert [config.layer_spec(i).attention for i in range(2)] == [AttentionSpec("sliding", 4096)] * 2
    # a window covering the whole context is plain causal attention
    ok = model_config_from_hf({**cfg, "sliding_window": 32768})
    assert ok.sliding_window is None and ok.layer_types is None
    # Qwen2 configs carry a sliding_window that is off unless use_sliding_window is set; then it
    # covers the layers from max_window_layers on
    qwen = model_config_from_hf({**cfg, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False})
    assert qwen.sliding_window is None and qwen.attention_bias and qwen.layer_types is None
    qwen = model_config_from_hf({**cfg, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
                                 "max_window_layers": 1})
    assert [qwen.layer_spec(i).attention.kind for i in range(2)] == ["full", "sliding"]
    with pytest.raises(ValueError, match="unsupported layer type 'chunked_attention'"):
        model_config_from_hf({**cfg, "layer_types": ["chunked_attention", "full_attention"]})
    with pytest.raises(ValueError, match="window must be >= 1"):
        model_config_from_hf({**cfg, "sliding_window": 0})


def test_rope_formats_and_unsupported_rope():
    base = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "eos_token_id": [5, 6],
    }
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    old = model_config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **llama3}})
    new = model_config_from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **llama3}})
    assert old == new and old.rope_theta == 500000.0 and old.rope_scaling["rope_type"] == "llama3"
    assert old.eos_token_ids == [5, 6] and old.num_kv_heads == 4 and old.head_dim == 16
    plain = model_config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e6
    with pytest.raises(ValueError, match="yarn"):
        model_config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="architecture"):
        model_config_from_hf({**base, "architectures": []})


def test_bundled_configs_on_meta():
    assert {"llama-3.1-8b", "qwen3-0.6b"} <= set(bundled_config_names())
    model, config = _load("llama-3.1-8b", "dummy", device="meta")
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (4096, 32, 32, 8)
    assert config.rope_scaling["rope_type"] == "llama3" and config.rope_theta == 500000.0
    assert not config.tie_word_embeddings and config.eos_token_ids == [128001, 128008, 128009]
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    model, config = _load("qwen3-0.6b", "dummy", device="meta")
    assert config.qk_norm and config.tie_word_embeddings and config.head_dim == 128
    assert sum(p.numel() for p in model.parameters()) == 596_049_920
    with pytest.raises(FileNotFoundError, match="dummy"):
        _load("llama-3.1-8b", "auto")
    assert load_tokenizer("qwen3-0.6b", "dummy") is None


def test_dummy_tiny_override_runs_and_is_deterministic():
    from conftest_models import PagedKVCache

    overrides = {"num_layers": 2, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96,
                 "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "max_position_embeddings": 512}
    a, config = _load("qwen3-0.6b", "dummy", config_overrides=overrides)
    b, _ = _load("qwen3-0.6b", "dummy", config_overrides=overrides)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    assert torch.all(a.model.norm.weight == 1)
    logits = PagedKVCache(config, num_blocks=8, block_size=4).step(a, [(0, [1, 2, 3, 4, 5])])
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    assert load_model_config("llama-3.1-8b", "dummy").vocab_size == 128256


def test_attention_backend_names():
    assert get_attention_backend("torch").name == "torch"
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("flash")
