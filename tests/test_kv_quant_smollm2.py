"""Quality of the 8-bit KV cache on the real embedded SmolLM2 (CPU, torch path), teacher-forced
on the start of Debian's GPL-3 text against the fp32 cache.

int8 meets the issue's bound (perplexity within 0.5%); fp8 e4m3 does not on this model
(+0.69% here, +1.29% on the whole text: docs/kv_cache.md), so its bounds are the measured
figures with a margin, there to catch a regression, not to claim the target. fp8's perplexity
change over these 511 tokens moves with the CPU's float arithmetic (the same code gives +0.69%
on an AVX-512 EPYC, +3.1% on an AVX2-only one: a few tokens near a rounding edge of the 8-bit
cache swing it), while its KL and top-1 agreement stay put, so those carry the tight bounds."""

import pytest

from flashserve import LLM
from flashserve.bench.quality import compare, read_texts

pytestmark = pytest.mark.slow

NUM_TOKENS = 512
CHUNK = 128  # later chunks read the earlier ones back from the quantized cache
# measured 2026-12-02 (AMD EPYC with AVX-512, 2 cores): int8 ppl -0.08%, KL 0.0020, top-1 98.8%;
# fp8 ppl +0.69%, KL 0.0156, top-1 94.1%; AVX2-only AMD EPYC, same code: fp8 ppl +3.1%, KL 0.0172, top-1 94.3%
BOUNDS = {"int8": (0.005, 0.005, 0.97), "fp8": (0.05, 0.03, 0.92)}  # |ppl change|, KL, top-1


def _engine(kv_cache_dtype: str):
    # the exact (dequantized fp32) weights, so that only the cache differs (as docs/kv_cache.md measured)
    return LLM(device="cpu", kv_cache_dtype=kv_cache_dtype, quantization="none", max_model_len=1024,
               kv_cache_bytes=64 << 20, verbose=False).engine


def test_smollm2_quality_of_8bit_kv_cache():
    ref = _engine("auto")
    ids = ref.encode(read_texts())[:NUM_TOKENS]
    ref_chunks = list(ref.score(ids, CHUNK))
    del ref
    for kv, (ppl, kl, top1) in BOUNDS.items():
        rep = compare(_engine(kv).score(ids, CHUNK), iter(ref_chunks), ids)
        assert rep.num_tokens == NUM_TOKENS - 1
        assert abs(rep.perplexity_change) < ppl, (kv, rep)
        assert 0 < rep.kl_divergence < kl, (kv, rep)
        assert rep.top1_agreement > top1, (kv, rep)
