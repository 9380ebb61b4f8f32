"""The model registry and per-layer specs: layers are assembled from the config, unknown parts
are clear errors before anything is allocated."""

import dataclasses

import pytest
import torch
from torch import nn

from flashserve.config import AttentionSpec, LayerSpec, ModelConfig
from flashserve.layers.attention import TorchAttentionBackend
from flashserve.loader import build_model
from flashserve.models import blocks
from flashserve.models.registry import model_class

TINY = ModelConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=64)


def test_architectures_resolve_and_unknown_ones_are_named():
    assert model_class("qwen3").__name__ == "LlamaForCausalLM"
    with pytest.raises(ValueError, match="no model implements architecture 'gpt2'; supported: gemma3, llama, mistral"):
        model_class("gpt2")


def test_layers_take_their_mlp_and_rope_base_from_the_spec(monkeypatch):
    class ScaledMLP(nn.Module):  # a stand-in MLP kind registered for this test
        def __init__(self, config, prefix=""):
            super().__init__()
            self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

        def forward(self, x):
            return 2 * self.proj(x)

    monkeypatch.setitem(blocks.MLP_TYPES, "scaled", ScaledMLP)
    specs = (LayerSpec(), LayerSpec(AttentionSpec(rope_theta=500.0), "scaled"), LayerSpec())
    model = build_model(dataclasses.replace(TINY, layer_types=specs), torch.float32, "cpu", TorchAttentionBackend())
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["GatedSiluMLP", "ScaledMLP", "GatedSiluMLP"]
    bases = [layer.self_attn.rotary_emb.base for layer in model.model.layers]
    assert bases == [10000.0, 500.0, 10000.0] and len(model.model.rotary) == 2
    assert model.model.layers[0].self_attn.rotary_emb is model.model.layers[2].self_attn.rotary_emb


def test_unknown_layer_parts_are_refused_before_allocation():
    bad_mlp = dataclasses.replace(TINY, layer_types=(LayerSpec(), LayerSpec(mlp="geglu_xl"), LayerSpec()))
    with pytest.raises(ValueError, match="layer 1: unknown MLP type 'geglu_xl'"):
        build_model(bad_mlp, torch.float32, "meta", TorchAttentionBackend())
    class FullOnly(TorchAttentionBackend):
        attention_kinds = ("full",)

    windowed = dataclasses.replace(TINY, layer_types=(LayerSpec(AttentionSpec("sliding", 16)),) * 3)
    with pytest.raises(ValueError, match="layer 0: the torch attention backend does not implement 'sliding'"):
        build_model(windowed, torch.float32, "meta", FullOnly())
    with pytest.raises(ValueError, match="layer_types lists 2 layers, the model has 3"):
        dataclasses.replace(TINY, layer_types=(LayerSpec(), LayerSpec()))
