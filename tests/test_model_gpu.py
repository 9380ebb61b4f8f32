"""The decoder on CUDA (torch and Triton attention backends) vs the HF fp32 CPU oracle.

fp32 must match tightly; bf16 must stay close (logit scale ~1 here) and agree on most argmaxes.
Skipped without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from conftest_models import TINY_ARCHS, PagedKVCache, make_tiny_checkpoint
from flashserve.layers.attention import get_attention_backend
from flashserve.loader import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _backends() -> list[str]:
    names = ["torch"]
    try:
        get_attention_backend("triton")
        names.append("triton")
    except Exception:
        pass
    return names


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_gpu_matches_hf(tmp_path, arch, dtype, backend):
    hf = make_tiny_checkpoint(arch, tmp_path, seed=7)
    device = torch.device("cuda")
    model, config = load_model(str(tmp_path), "auto", dtype, device, get_attention_backend(backend))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (23, 5, 1)]
    cache = PagedKVCache(config, num_blocks=64, block_size=16, dtype=dtype, device=device)
    # chunked prefill of prompt 0 (two chunks), then a decode step of all three
    first = cache.step(model, [(0, prompts[0][:15]), (1, prompts[1]), (2, prompts[2])])
    second = cache.step(model, [(0, prompts[0][15:]), (1, [9]), (2, [9])])
    with torch.no_grad():
        refs = [hf(torch.tensor([p])).logits[0, -1] for p in prompts]
        refs2 = [hf(torch.tensor([prompts[0]])).logits[0, -1]] + [
            hf(torch.tensor([p + [9]])).logits[0, -1] for p in prompts[1:]
        ]
    ours = torch.cat([first[1:], second]).cpu()
    ref = torch.stack(refs[1:] + refs2)
    atol = 2e-4 if dtype == torch.float32 else 0.15
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0 if dtype == torch.float32 else 0.05)
