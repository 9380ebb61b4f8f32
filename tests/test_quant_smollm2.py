"""The embedded SmolLM2 quantized on the CPU: the default (packed GGUF) engine scores real text
(Debian's GPL-3, read at run time) like the dense-torch reference of the same quantized
arithmetic and starts its greedy answers the same way; every weight mode's perplexity stays
within its bound."""

from __future__ import annotations

import pytest

from flashserve import LLM, SamplingParams
from flashserve.bench.quality import compare, read_texts
from flashserve.quant.packed import PackedWeight

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain what a KV cache is in a transformer."}],
]
COMMON = dict(device="cpu", max_model_len=1024, kv_cache_bytes=96 << 20, verbose=False)


def test_default_is_packed_and_greedy_equals_the_reference_arithmetic():
    llm = LLM(**COMMON)
    model = llm.engine.worker.model
    assert model.model.layers[0].mlp.gate_up_proj.quant_method.label == "gguf-Q4_1"
    assert model.lm_head.quant_method.label == "gguf-Q8_0" and model.model.embed_tokens.quant_method.label == "gguf-Q8_0"
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ours = [o.token_ids for o in llm.chat(CHATS, params, use_tqdm=False)]
    reference = LLM(**COMMON)
    for part in reference.engine.worker.model.modules():  # dense torch ops, same roundings
        if isinstance(part, PackedWeight):
            part.forward = part.reference
    theirs = [o.token_ids for o in reference.chat(CHATS, params, use_tqdm=False)]
    # Another summation order (bf16 partial products in torch's int4 kernel) may flip a near-tie
    # later in an answer; the openings and the teacher-forced distributions must agree.
    assert [t[:8] for t in theirs] == [t[:8] for t in ours]
    assert "Paris" in llm.tokenizer.decode(ours[0])
    ids = llm.engine.encode(read_texts())[:512]
    report = compare(llm.engine.score(ids, 256), reference.engine.score(ids, 256), ids)
    assert report.kl_divergence < 2e-3 and report.top1_agreement > 0.97, report  # measured 1.2e-3, 0.980


# mode -> largest perplexity increase over the dense fp32 model (the GGUF's Q4_1 values), top-1
# agreement. int4 with zero points in groups of 32 lands on the file's own Q4_1 grid and keeps
# it; symmetric int4 (groups of 64: 128 does not divide 576) requantizes 4-bit values onto
# another grid and costs about +27% here (docs/quantization.md): its bound only guards against
# regressions, the 5% target is not met by it on this model. fp8 measures +1.21%, over the
# issue's 1% target (documented): its bound too only guards against regressions.
BOUNDS = {"auto": (0.005, 0.95), "int8": (0.01, 0.9), "fp8": (0.015, 0.88), "int4-g32-zp": (0.05, 0.9),
          "int4": (0.35, 0.6)}


def test_quality_of_every_weight_mode_on_gpl3():
    reference = LLM(**COMMON, quantization="none").engine
    ids = reference.encode(read_texts())[:1024]
    ref_scores = list(reference.score(ids, 512))
    for mode, (ppl_bound, top1_bound) in BOUNDS.items():
        cand = LLM(**COMMON, quantization=mode).engine
        report = compare(cand.score(ids, 512), iter(ref_scores), ids)
        assert report.perplexity_change <= ppl_bound, (mode, report)
        assert report.top1_agreement >= top1_bound, (mode, report)
