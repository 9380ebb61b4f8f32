"""CPU weights packed into one huge-page mapping: same outputs, ties kept, one storage."""

import torch

from conftest_models import PagedKVCache, make_tiny_checkpoint
from flashserve.layers.attention import TorchAttentionBackend
from flashserve.loader import load_model
from flashserve.runner.host_weights import pack_weights_in_huge_pages


def test_packing_keeps_outputs_ties_and_puts_every_weight_in_one_mapping(tmp_path):
    make_tiny_checkpoint("llama_mha_tied", tmp_path, seed=2)
    model, config = load_model(str(tmp_path), "auto", torch.float32, torch.device("cpu"), TorchAttentionBackend())
    prompt = torch.randint(3, config.vocab_size, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    before = PagedKVCache(config, num_blocks=16, block_size=4).step(model, [(0, prompt)])
    packed = pack_weights_in_huge_pages(model)
    after = PagedKVCache(config, num_blocks=16, block_size=4).step(model, [(0, prompt)])
    assert torch.equal(before, after)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    tensors = list(model.parameters()) + list(model.buffers())
    start = min(t.data_ptr() for t in tensors)
    end = max(t.data_ptr() + t.numel() * t.element_size() for t in tensors)
    assert end - start <= packed == len(model._huge_page_weights)
    assert all(t.data_ptr() % 64 == 0 for t in tensors)
