"""The engine on the real SmolLM2 model: text APIs, streaming, stop strings, bad input."""

import pytest
import torch

from flashserve import LLM, SamplingParams
from flashserve.engine.detokenizer import Detokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", max_model_len=512, kv_cache_bytes=64 << 20, verbose=False)


def test_generate_outputs_and_metrics(llm):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    assert out.prompt == "The capital of France is"
    m = out.metrics
    assert m.time_to_first_token > 0 and m.time_per_output_token(8) > 0 and m.e2e_latency >= m.time_to_first_token


def test_eos_ends_with_stop(llm):
    out = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=200),
                   use_tqdm=False)[0]
    assert out.finish_reason == "stop" and len(out.token_ids) < 200
    assert out.token_ids[-1] in llm.engine.eos_token_ids and "<|im_end|>" not in out.text


def test_stream_equals_generate(llm):
    params = SamplingParams(temperature=0, max_tokens=40)
    pieces = list(llm.stream("Once upon a time", params))
    assert len(pieces) > 5
    assert "".join(pieces) == llm.generate("Once upon a time", params, use_tqdm=False)[0].text


def test_stop_string_spanning_tokens_is_cut(llm):
    full = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].text
    assert " 6, 7" in full
    stop = "6, 7"  # several tokens: "6", ",", " 7"
    out = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20, stop=[stop]), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.text == full[: full.index(stop)]
    streamed = "".join(llm.stream("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20, stop=[stop])))
    assert streamed == out.text


def test_multibyte_characters_detokenize_incrementally(llm):
    text = "Grüße aus Köln: 日本語のテキスト 🚀🎉 naïve café"
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    detok = Detokenizer(llm.tokenizer)
    state = detok.new_state([], skip_special_tokens=True, stop=[])
    pieces = []
    for t in ids:
        detok.append(state, [t])
        piece = detok.take_delta(state, finished=False)
        assert "\ufffd" not in piece
        pieces.append(piece)
    detok.flush(state)
    pieces.append(detok.take_delta(state, finished=True))
    assert "".join(pieces) == text


def test_long_text_folds_and_still_stops(llm):
    """Past ``_FOLD`` characters the detokenizer folds its text into a head: the deltas, the text
    handed out so far and a stop string spanning tokens far into the text are as without it."""
    text = " ".join(f"item{i} = {i * i} ✓" for i in range(400)) + " and then the END marker, never shown"
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    detok = Detokenizer(llm.tokenizer)
    state = detok.new_state([], skip_special_tokens=True, stop=["the END", "zzz-not-there"])
    pieces = []
    for t in ids:
        detok.append(state, [t])
        pieces.append(detok.take_delta(state, finished=state.stopped_on is not None))
        assert detok.emitted_text(state) == "".join(pieces)
        if state.stopped_on is not None:
            break
    assert state.stopped_on == "the END" and state.head  # it folded
    assert "".join(pieces) == text[: text.index("the END")]


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("", SamplingParams(), "prompt is empty"),
        ([], SamplingParams(), "prompt is empty"),
        ("word " * 600, SamplingParams(), "context is 512 tokens"),
        ([10**6], SamplingParams(), "outside the vocabulary"),
    ],
)
def test_bad_prompts_are_refused_and_the_engine_keeps_serving(llm, prompt, params, message):
    engine = llm.engine
    engine.add_request("ok-1", "Hello there", SamplingParams(temperature=0, max_tokens=6))
    engine.step()  # ok-1 is running
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert done["ok-1"].finish_reason == "length" and len(done["ok-1"].token_ids) == 6
    assert engine.block_manager.num_used_blocks == 0


def test_bad_sampling_values_in_a_batch_name_the_prompt(llm):
    with pytest.raises(ValueError, match=r"prompt 1: max_tokens must be an integer in \[1, "):
        bad = SamplingParams()
        bad.max_tokens = 0
        llm.generate(["fine", "also fine"], [SamplingParams(), bad], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("a", "Tell me a long story", SamplingParams(max_tokens=100))
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    assert engine.abort_request("a") and not engine.abort_request("a")
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()


def test_kv_pool_too_small_for_the_context_is_refused():
    with pytest.raises(ValueError, match=r"holds 2 blocks of 16 tokens = 32 tokens .* max_model_len=512 tokens needs 32 blocks"):
        LLM(device="cpu", max_model_len=512, kv_cache_bytes=2 * 30 * 2 * 16 * 3 * 64 * 4, verbose=False)


def test_bfloat16_on_cpu_agrees_with_float32(llm):
    """bf16 on CPU runs end to end, and its first reply token is one fp32 ranks near the top.
    (Exact greedy text in bf16 depends on the CPU's bf16 arithmetic, so it is not compared.)"""
    bf16 = LLM(device="cpu", dtype="bfloat16", max_model_len=256, kv_cache_bytes=16 << 20, verbose=False)
    assert bf16.engine.worker.kv_pool.dtype == bf16.engine.dtype == torch.bfloat16
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    out = bf16.chat(chat, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert len(out.token_ids) > 0 and out.text
    ref = llm.chat(chat, SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)[0]
    top5 = [t for t, _ in ref.outputs[0].logprobs[0][2]]
    assert out.token_ids[0] in top5


def stream_equals_windows(tokenizer, seed: int) -> None:
    """The tokenizers library's streaming and this module's decoding windows give the same deltas
    (random ids, special tokens included, both skip settings, with a prompt's tail as context), and
    their concatenation is the decoded output."""
    import random

    rng = random.Random(seed)
    vocab = len(tokenizer)
    fast, windows = Detokenizer(tokenizer), Detokenizer(tokenizer, stream=False)
    assert fast._backend is not None and windows._backend is None
    specials = list(tokenizer.all_special_ids)
    for skip in (True, False):
        prompt = [rng.randrange(vocab) for _ in range(7)]
        out = [rng.choice(specials) if rng.random() < 0.05 else rng.randrange(vocab) for _ in range(300)]
        pieces = []
        for detok in (fast, windows):
            state = detok.new_state(prompt, skip_special_tokens=skip, stop=[])
            got = []
            for t in out:
                detok.append(state, [t])
                got.append(detok.take_delta(state, finished=False))
            detok.flush(state)
            got.append(detok.take_delta(state, finished=True))
            pieces.append(got)
        assert pieces[0] == pieces[1]
        text = tokenizer.decode(prompt[-5:] + out, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        assert text.endswith("".join(pieces[0]))


def test_streamed_detokenization_equals_the_windows(llm):
    stream_equals_windows(llm.tokenizer, seed=0)


def test_a_request_nobody_streams_is_detokenized_when_it_finishes(llm):
    """``stream=False`` (what ``generate`` uses): no text is decoded while the request runs,
    unless it has stop strings; at its end the text, tokens and logprobs equal a streamed twin's."""
    engine = llm.engine
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=24, n=2, logprobs=2)
    prompt = "Grüße aus Köln: 日本語"
    engine.add_request("streamed", prompt, params)
    engine.add_request("batch", prompt, params, stream=False)
    engine.add_request("batch-stop", "1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20, stop=["6, 7"]),
                       stream=False)
    final = {}
    for step in range(100):
        for out in engine.step():
            assert out.finished or out.request_id == "streamed"
            if out.finished:
                final[out.request_id] = out
        if step == 4:
            states = engine._decode_states
            assert states["streamed#0"].num_read > 0 and states["batch#0"].num_read == 0
            assert states["batch-stop"].num_read > 0  # searched for its stop string as it grows
        if not engine.has_unfinished_requests():
            break
    summary = [[(c.text, c.token_ids, [(i, len(top)) for i, _, top in c.logprobs], c.finish_reason)
                for c in final[rid].outputs] for rid in ("streamed", "batch")]
    assert summary[0] == summary[1] and all(text for text, *_ in summary[0])
    # logprob values to within bf16 steps of the logits (the runner-up ids may swap on near ties):
    # the twins' prompts share a batch, and not every CPU gives both rows the same bits (an
    # AVX2-only EPYC moves a logit by one bf16 step)
    for a, b in zip(final["streamed"].outputs, final["batch"].outputs):
        assert [lp for _, lp, _ in a.logprobs] == pytest.approx([lp for _, lp, _ in b.logprobs], abs=0.2)
    assert final["batch-stop"].finish_reason == "stop" and "6, 7" not in final["batch-stop"].text


def test_multi_step_plans_cut_at_stop_strings_as_one_step_plans_do(llm):
    """A multi-step plan brings several tokens at once: the engine drops those after the one that
    completes a stop string (and a length end that came later turns into the stop), so text, tokens
    and finish reasons equal one-step plans', streamed or not."""
    prompts = ["1, 2, 3, 4,", "The capital of France is", "Once upon a time", "a, b, c, d,", "1, 2, 3, 4,"]
    params = [SamplingParams(temperature=0, max_tokens=20, stop=["6, 7"]),
              SamplingParams(temperature=0, max_tokens=24, stop=[" Paris", "zzz"]),
              SamplingParams(temperature=0, max_tokens=9, stop=["zzz-not-there"]),
              SamplingParams(temperature=0, max_tokens=7, stop=[" g"]),
              SamplingParams(temperature=0, max_tokens=7, stop=["6,"])]  # "6," inside the plan that reaches max_tokens
    multi = LLM(device="cpu", max_model_len=512, kv_cache_bytes=64 << 20, verbose=False, num_scheduler_steps=4)
    steps = []
    schedule = multi.engine.core.schedule

    def recorded():
        plan = schedule()
        steps.append(plan.decodes.num_steps if plan.decodes is not None else 1)
        return plan

    multi.engine.core.schedule = recorded

    def summary(outs):
        return [(o.text, o.token_ids, o.finish_reason, o.outputs[0].stop_reason) for o in outs]

    want = summary(llm.generate(prompts, params, use_tqdm=False))
    got = summary(multi.generate(prompts, params, use_tqdm=False))
    assert got == want and 4 in steps
    assert [w[2] for w in want] == ["stop", "stop", "length", "stop", "stop"]
    for prompt, p, w in zip(prompts, params, want):
        assert "".join(multi.stream(prompt, p)) == w[0]


def test_stop_strings_under_min_tokens_when_a_step_brings_several_tokens(llm):
    """min_tokens holds stop strings back token by token: a stop string completed before the
    min_tokens-th output token does not count, even when that token came in the same step as later
    ones (n-gram drafts accepted several at once, or a multi-step plan); text, tokens and finish
    reasons equal one token per step's."""
    prompt = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3,"
    params = [SamplingParams(temperature=0, max_tokens=24, stop=[","], min_tokens=m) for m in (0, 3, 6, 9, 13)]
    params.append(SamplingParams(temperature=0, max_tokens=24, stop=[" 9"], min_tokens=14))  # " 9" once before, then after

    def summary(engine):
        return [(o.text, o.token_ids, o.finish_reason, o.outputs[0].stop_reason)
                for o in engine.generate([prompt] * len(params), params, use_tqdm=False)]

    want = summary(llm)
    assert [w[2] for w in want] == ["stop"] * 5 + ["stop"] and len({w[0] for w in want}) >= 4
    spec = LLM(device="cpu", max_model_len=512, kv_cache_bytes=64 << 20, verbose=False,
               speculative_config={"method": "ngram", "num_speculative_tokens": 6})
    assert summary(spec) == want
    assert spec.engine.stats().spec.acceptance_length > 1.5  # several tokens per step
    multi = LLM(device="cpu", max_model_len=512, kv_cache_bytes=64 << 20, verbose=False, num_scheduler_steps=4)
    assert summary(multi) == want
