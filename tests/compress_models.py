"""Tiny models for the compression and cascade tests.

``tiny_smollm_vocab(folder, layers)``: a random Llama with SmolLM2's vocabulary (49152 ids, GQA,
tied embeddings, 96 hidden) and the SmolLM2 tokenizer with its chat template, so the text paths
(calibration text, chat prompts, generated text) run as they do on the real model, in seconds.
Returns the transformers model that wrote it (fp32, eval) as the oracle.
"""

from __future__ import annotations

from pathlib import Path

import torch

from conftest_models import copy_smollm2_tokenizer


def tiny_smollm_vocab(folder: str | Path, layers: int = 4, seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=96, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=1024, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in name else 0.1 * torch.randn(p.shape, generator=g))
    model.tie_weights()
    model = model.float().eval()
    model.config._attn_implementation = "eager"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    copy_smollm2_tokenizer(folder)
    return model
