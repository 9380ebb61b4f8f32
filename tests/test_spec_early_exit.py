"""Early exit (a lossy mode): a threshold no token reaches changes nothing; a threshold every
token reaches at layer 1 decodes exactly like the model cut after layer 1 (transformers, the
later layers deleted); tokens that exit feed later layers' K/V from their exit state, and the
forward reports the layers it ran."""

import random

import pytest
import torch

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ee_tiny")
    hf = make_tiny_checkpoint("llama3_gqa", folder, seed=6)
    return str(folder), hf


def _prompts():
    rng = random.Random(3)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(5, 20))] for _ in range(4)]


KW = dict(device="cpu", block_size=4, max_model_len=128, verbose=False)


def test_unreached_threshold_is_the_full_model(tiny):
    folder, _ = tiny
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ref = [o.token_ids for o in LLM(model=folder, **KW).generate(_prompts(), sp, use_tqdm=False)]
    for measure in ("softmax", "hidden"):
        llm = LLM(model=folder, **KW, early_exit_config={"threshold": 1.0, "measure": measure, "exit_layers": [1]})
        assert [o.token_ids for o in llm.generate(_prompts(), sp, use_tqdm=False)] == ref
        assert llm.engine.worker.early_exit.layers_per_token == 2.0


def test_always_exiting_at_layer_one_is_the_truncated_model(tiny):
    folder, hf = tiny
    # Every prompt in the first step: decode tokens in a step mixed with a prompt chunk run the full model.
    llm = LLM(model=folder, **KW, max_num_batched_tokens=128, early_exit_config={"threshold": 1e-6, "exit_layers": [1]})
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(_prompts(), sp, use_tqdm=False)
    hf.model.layers = hf.model.layers[:1]
    hf.config.num_hidden_layers = 1
    for prompt, out in zip(_prompts(), outs):
        # The prompt runs the full model (its K/V feed layer 2), so only decode tokens are cut:
        # the first token comes from the full model, the rest from layer 1 of the same cache.
        first = out.token_ids[0]
        ids = torch.tensor([prompt + [first]])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=11, do_sample=False,
                          pad_token_id=0)[0, len(prompt) + 1:].tolist()
        assert out.token_ids[1:] == ref
    assert llm.engine.worker.early_exit.layers_per_token == pytest.approx(1.0)


def test_early_exit_on_packed_gguf_weights(tmp_path):
    """A Q4_1 GGUF kept packed (embedding included, as the embedded SmolLM2): early exit runs, and
    a threshold nobody reaches decodes exactly like the model without early exit."""
    from conftest_models import write_tiny_gguf

    folder = tmp_path / "hf"
    hf = make_tiny_checkpoint("llama3_gqa", folder, seed=6)  # its own copy: another test cuts the fixture's layers
    path = tmp_path / "tiny.Q4_1.gguf"
    write_tiny_gguf(hf, path, "Q4_1")
    kw = dict(KW, model=str(path), tokenizer=str(folder))  # the file's token list is placeholders
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = [o.token_ids for o in LLM(**kw).generate(_prompts(), sp, use_tqdm=False)]
    llm = LLM(**kw, early_exit_config={"threshold": 1.0, "exit_layers": [1]})
    assert [o.token_ids for o in llm.generate(_prompts(), sp, use_tqdm=False)] == ref
    assert llm.engine.worker.early_exit.tokens > 0


def test_exited_tokens_write_every_later_layers_kv(tiny):
    """A token that exits (here every token, alone in its step) still gets the K/V of the layers
    after its exit, propagated from its exit state: the next tokens' later layers read them."""
    folder, _ = tiny
    llm = LLM(model=folder, **KW, early_exit_config={"threshold": 1e-6, "exit_layers": [1]})
    engine = llm.engine
    worker = engine.worker
    worker.kv_pool.fill_(float("nan"))  # a slot nobody writes stays NaN
    ids = _prompts()[0] + _prompts()[1]
    for _ in engine.score(ids, chunk_size=1):  # every token a one-token step through the early-exit forward
        pass
    written = [int(torch.isfinite(k).all(-1).all(-1).sum()) for k, _ in worker.kv_caches]
    assert written == [len(ids) - 1] * len(written)  # the scored tokens' K, in every layer
    ee = worker.early_exit
    assert ee.exits_at == {1: len(ids) - 1} and ee.exit_share == 1.0 and ee.layers_per_token == 1.0


def test_bad_early_exit_configs(tiny):
    folder, _ = tiny
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        LLM(model=folder, **KW, early_exit_config={"threshold": 0})
    with pytest.raises(ValueError, match="measure must be one of softmax, hidden"):
        LLM(model=folder, **KW, early_exit_config={"measure": "entropy"})
    with pytest.raises(ValueError, match="exit_layers must be below the model's 2 layers"):
        LLM(model=folder, **KW, early_exit_config={"exit_layers": [2]})
    with pytest.raises(ValueError, match="separate modes"):
        LLM(model=folder, **KW, early_exit_config={}, speculative_config={"method": "ngram", "num_speculative_tokens": 2})


def test_sweep_reports_quality_exits_and_work(tiny):
    """``flashserve bench early-exit``'s rows: a threshold nobody reaches is the full model (KL 0,
    but every token paid an LM-head test); one everybody reaches at layer 1 exits every token."""
    from flashserve.spec.early_exit_eval import _thresholds, sweep

    folder, _ = tiny
    engine = LLM(model=folder, **KW, early_exit_config={"exit_layers": [1]}).engine
    ids = _prompts()[0] + _prompts()[2]
    never, always = sweep(engine, ids, [1.0, 1e-6])
    n = len(ids) - 1
    assert never["tokens"] == always["tokens"] == n
    assert never["kl"] == pytest.approx(0.0, abs=1e-6) and never["top1_agreement"] == 1.0 and never["exit_share"] == 0.0
    assert never["layers_per_token"] == 2.0 and never["tests_per_token"] == 1.0 and never["work_vs_full"] > 1.0
    assert always["exit_share"] == 1.0 and always["exits_at"] == {1: n} and always["layers_per_token"] == 1.0
    assert always["kl"] > 0 and always["work_vs_full"] < never["work_vs_full"]
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        _thresholds("0.9,1.5")


def test_gemma3_early_exit(tmp_path):
    """Gemma 3 (scaled embedding; layers sliding, full, sliding: three KV groups): a threshold nobody
    reaches is the full model; tokens exiting at layer 1 write the later layers' K/V into each
    layer's own group, where a later request's prefill reads them through the prefix cache (the
    pool starts as NaN, so K/V written to another group's slots would make its logits NaN)."""
    folder = str(tmp_path)
    make_tiny_checkpoint("gemma3", folder, seed=2)
    kw = dict(KW, model=folder, block_size=2)
    prompts = [[rng.randrange(3, 500) for _ in range(12)] for rng in [random.Random(4)]] + _prompts()
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)  # past the window of 8
    ref = [o.token_ids for o in LLM(**kw).generate(prompts, sp, use_tqdm=False)]
    llm = LLM(**kw, early_exit_config={"threshold": 1.0, "exit_layers": [1]})
    assert [o.token_ids for o in llm.generate(prompts, sp, use_tqdm=False)] == ref

    llm = LLM(**kw, enable_prefix_caching=True, early_exit_config={"threshold": 1e-6, "exit_layers": [1]})
    llm.engine.worker.kv_pool.fill_(float("nan"))
    prompt = [7, 8]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert llm.engine.worker.early_exit.exits_at.get(1, 0) >= 3  # positions 2-4 exited (K/V propagated)
    again = llm.generate([prompt + out.token_ids], SamplingParams(temperature=0, max_tokens=1, logprobs=1),
                         use_tqdm=False)[0]
    assert again.num_cached_tokens >= 4  # blocks [7, 8] and the propagated positions 2-3
    assert all(torch.isfinite(torch.tensor(lp)) for _, lp, _ in again.outputs[0].logprobs)
