"""Speculative decoding in the engine, on a tiny model: greedy outputs are identical with and
without each proposer (n-gram, a draft model, the target's first layers, trained heads; chains
and token trees), under batching, the serial and the overlapped loop, chunked prefill, prefix
caching, preemption by recompute and by swap, and a Worker in another process; a draft equal to
the target accepts every draft; bad configurations are clear errors."""

import itertools
import random

import pytest

from conftest_models import make_tiny_checkpoint
from flashserve import LLM, SamplingParams

BLOCK = 2 * 2 * 4 * 2 * 16 * 4  # bytes of one fp32 block of the tiny model (see test_engine_loop)
BASE = dict(device="cpu", block_size=4, max_model_len=128, verbose=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec_tiny")
    make_tiny_checkpoint("llama3_gqa", folder, seed=6)
    return str(folder)


def train_small_heads(model: str, folder, num_prompts: int, max_tokens: int, epochs: int, min_top1: float,
                      **engine) -> str:
    """Three heads trained for a few seconds on ``model``'s own generations, saved in ``folder``;
    their first head's top-1 accuracy must pass ``min_top1`` (they learned the model's habits)."""
    from flashserve.spec.heads import save_heads
    from flashserve.spec.train_heads import train_heads

    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(4, 12))] for _ in range(num_prompts)]
    llm = LLM(model=model, **BASE, **engine)
    heads, meta, rep = train_heads(llm.engine, prompts, num_heads=3, max_tokens=max_tokens, epochs=epochs,
                                   batch_size=64, lr=3e-3, log=lambda *a: None)
    assert rep.accuracy[0][7] >= rep.accuracy[0][0] > min_top1
    path = folder / "heads.safetensors"
    save_heads(heads, meta, path)
    return str(path)


@pytest.fixture(scope="module")
def heads_file(tiny, tmp_path_factory):
    return train_small_heads(tiny, tmp_path_factory.mktemp("heads"), num_prompts=12, max_tokens=32, epochs=6,
                             min_top1=0.3)


def workload():
    """Greedy requests (exact comparison): shared prefixes, a repetitive prompt (n-gram hits),
    penalties, stop ids with min_tokens, logprobs, long and short outputs."""
    rng = random.Random(3)
    stem = [rng.randrange(3, 500) for _ in range(20)]
    prompts = [stem[: rng.randrange(6, 20)] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 20))]
               for _ in range(8)]
    prompts[1] = prompts[1][:6] * 4
    params = [
        SamplingParams(temperature=0, max_tokens=28, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.4, frequency_penalty=0.3),
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[7, 11, 13, 17, 19], min_tokens=4),
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2),
    ]
    return prompts, [params[i % len(params)] for i in range(len(prompts))]


def run(folder, spec=None, **kw):
    prompts, params = workload()
    if spec is not None and spec["method"] == "draft":  # the draft's own K/V: same block count, twice the bytes
        kw = {**kw, "kv_cache_bytes": 2 * kw["kv_cache_bytes"]}
    llm = LLM(model=folder, **BASE, speculative_config=spec, **kw)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        got = [(o.token_ids, o.finish_reason) for o in outs]
        lps = [lp for o in outs if o.outputs[0].logprobs for _, lp, _ in o.outputs[0].logprobs]
        stats = llm.engine.stats()
        llm.engine.block_manager.check_invariants()
        assert llm.engine.block_manager.num_used_blocks == 0
    finally:
        llm.engine.shutdown()
    return got, lps, stats, llm


MODES = {
    "overlapped": dict(kv_cache_bytes=1 << 21),
    "serial": dict(kv_cache_bytes=1 << 21, async_scheduling=False),
    "chunked": dict(kv_cache_bytes=1 << 21, max_num_batched_tokens=24),
    "recompute": dict(kv_cache_bytes=36 * BLOCK, preemption_mode="recompute", max_num_batched_tokens=48),
    "swap": dict(kv_cache_bytes=36 * BLOCK, preemption_mode="swap", swap_space_bytes=64 * BLOCK,
                 max_num_batched_tokens=48),
}


def spec_config(method, draft, heads_file, num_layers=1, **extra):
    """A test's ``speculative_config`` for ``method``: k = 4 (heads: 3, or 6 nodes in a tree), the
    off-switch off; ``draft``: the draft model folder, ``num_layers``: the ``layers`` draft's depth."""
    cfg = {"method": method, "num_speculative_tokens": 4, "disable_by_cost": False, **extra}
    if method == "draft":
        cfg["model"] = draft
    if method == "layers":
        cfg["num_layers"] = num_layers
    if method == "heads":
        cfg["heads"] = heads_file
        cfg["num_speculative_tokens"] = 3 if extra.get("tree_width", 1) == 1 else 6
    return cfg


# (method, tree width, engine mode): every method in several modes, every mode several times.
CASES = [
    ("ngram", 1, "overlapped"), ("ngram", 3, "recompute"), ("ngram", 1, "swap"),
    ("draft", 1, "chunked"), ("draft", 2, "swap"),
    ("layers", 1, "serial"), ("layers", 3, "overlapped"), ("layers", 1, "recompute"),
    ("heads", 1, "swap"), ("heads", 3, "chunked"),
]


@pytest.fixture(scope="module")
def references(tiny):
    return {mode: run(tiny, **kw) for mode, kw in MODES.items()}


@pytest.mark.parametrize("method,width,mode", CASES, ids=[f"{m}-w{w}-{mode}" for m, w, mode in CASES])
def test_greedy_outputs_identical(tiny, heads_file, references, method, width, mode):
    ref_tokens, ref_lps, ref_stats, _ = references[mode]
    got, lps, stats, llm = run(tiny, spec_config(method, tiny, heads_file, tree_width=width), **MODES[mode])
    assert got == ref_tokens
    assert lps == pytest.approx(ref_lps, abs=1e-4)
    assert stats.spec.num_steps > 0 and stats.spec.num_draft_tokens > 0
    if method != "draft":  # not every draft is right (the draft equal to the target is checked below)
        assert stats.spec.num_accepted_tokens < stats.spec.num_draft_tokens
    if mode in ("recompute", "swap"):
        assert stats.num_preemptions > 0
    if mode == "swap":
        assert llm.engine.scheduler.num_swap_outs > 0


def test_heads_train_and_speculate_on_a_quantized_lm_head(tiny, tmp_path):
    """A packed LM head (int8 here; GGUF heads are packed by default) has no dense weight: the
    heads train against the values its kernel multiplies by (``LMHead.dense_weight``, checked
    against the head's own products), load with a matching fingerprint, and speculate with the
    same greedy tokens as plain decoding on that engine."""
    import torch

    probe = LLM(model=tiny, **BASE, quantization="int8")
    head = probe.engine.worker.model.lm_head
    assert not isinstance(getattr(head, "weight", None), torch.Tensor)
    # bf16-exact inputs: the CPU int8 kernel takes bf16 activations and rounds its outputs (so the
    # identity's products too) to bf16, hence a tolerance of two bf16 steps of the largest logit
    x = torch.randn(5, head.in_features, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    y = head(x)
    torch.testing.assert_close(x @ head.dense_weight().t(), y, atol=2**-7 * float(y.abs().max()), rtol=0)
    probe.engine.shutdown()
    heads = train_small_heads(tiny, tmp_path, num_prompts=12, max_tokens=32, epochs=6, min_top1=0.3,
                              quantization="int8")
    plain, _, _, _ = run(tiny, quantization="int8", **MODES["overlapped"])
    got, _, stats, _ = run(tiny, spec_config("heads", tiny, heads), quantization="int8", **MODES["overlapped"])
    assert got == plain
    assert stats.spec.num_accepted_tokens > 0


def test_draft_equal_to_target_accepts_everything(tiny, heads_file):
    """Plain greedy (no penalties or bans, which the draft does not apply): the draft's drafts
    are the target's own tokens, so every one is accepted."""
    prompts, _ = workload()
    params = SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)
    llm = LLM(model=tiny, **BASE, speculative_config=spec_config("draft", tiny, heads_file), kv_cache_bytes=1 << 22)
    got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    ref = [o.token_ids for o in LLM(model=tiny, **BASE).generate(prompts, params, use_tqdm=False)]
    assert got == ref
    stats = llm.engine.stats().spec
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 100
    assert stats.acceptance_length > 4.0


def test_worker_in_another_process(tiny, heads_file, references):
    got, _, stats, _ = run(tiny, spec_config("ngram", tiny, heads_file, tree_width=2), executor="process", **MODES["swap"])
    assert got == references["swap"][0]
    assert stats.spec.num_accepted_tokens > 0


def test_off_switch_and_per_request_setting(tiny, heads_file, references):
    """With the off-switch on, n-gram drafts that rarely match send requests back to plain
    decoding; ``SamplingParams.num_speculative_tokens=0`` never speculates. Tokens never change."""
    prompts, params = workload()
    spec = {"method": "ngram", "num_speculative_tokens": 4}
    llm = LLM(model=tiny, **BASE, speculative_config=spec, kv_cache_bytes=1 << 21)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [(o.token_ids, o.finish_reason) for o in outs] == references["overlapped"][0]
    assert llm.engine.stats().spec.num_switched_off > 0
    assert not llm.engine.speculation.host_overlaps  # a CPU engine: the nothing-to-copy rule is off
    off = [SamplingParams(**{**vars(p), "num_speculative_tokens": 0}) for p in params]
    llm2 = LLM(model=tiny, **BASE, speculative_config=spec, kv_cache_bytes=1 << 21)
    results = []  # steps without draft slots run as in a plain engine (a few timed), a token list
    update = llm2.engine.core.update
    llm2.engine.core.update = lambda plan, result: results.append(result) or update(plan, result)
    outs = llm2.generate(prompts, off, use_tqdm=False)
    assert [(o.token_ids, o.finish_reason) for o in outs] == references["overlapped"][0]
    assert llm2.engine.stats().spec.num_steps == 0
    assert results and all(r.cost is None or r.cost.num_tokens == r.cost.num_seqs for r in results)
    # per-request results only where a request asked for logprobs
    assert all(r.tokens is not None or any(t.logprobs for t in r.sampled.values()) for r in results if r.sampled)
    assert sum(r.tokens is not None for r in results) > 5


def test_a_step_that_loads_a_kernel_reports_it(tiny, heads_file):
    """A kernel compiled or loaded between a speculative step's drafting and its sampling (here:
    Triton's load hook fired from inside the proposer, as a first launch would) marks that step's
    cost ``loaded_kernels``, and only that step's."""
    import triton

    prompts, params = workload()
    llm = LLM(model=tiny, **BASE, speculative_config=spec_config("ngram", tiny, heads_file),
              kv_cache_bytes=1 << 21)
    proposer = llm.engine.executor.worker.speculator.proposer
    calls, propose = [], proposer.propose

    def propose_and_maybe_load(items):
        calls.append(len(calls) % 3 == 1)
        if calls[-1]:
            triton.knobs.runtime.kernel_load_end_hook(None, None, "kernel", {}, "hash")
        return propose(items)

    proposer.propose = propose_and_maybe_load
    costs = []
    update = llm.engine.core.update
    llm.engine.core.update = lambda plan, result: costs.append(result.cost) or update(plan, result)
    llm.generate(prompts[:2], params[:2], use_tqdm=False)
    measured = [c.loaded_kernels for c in costs if c is not None]
    assert len(measured) == len(calls) > 4 and measured == calls


@pytest.mark.parametrize("switch,deferred", [(True, False), (False, False), (True, True)])
def test_plain_decode_steps_are_timed_for_the_off_switch(tiny, heads_file, references, switch, deferred):
    """With the off-switch on, one plain decode step in ``PLAIN_TIMING_EVERY`` reports its cost
    (one row per sequence, nothing drafted); prompt steps and, with the switch off, every plain
    step report none; nor does a step whose sampling waits for the next step (as a grammar's
    does: its span is not its cost)."""
    from flashserve.spec.controller import SpeculationController
    from flashserve.spec.speculator import PLAIN_TIMING_EVERY

    prompts, params = workload()
    llm = LLM(model=tiny, **BASE, speculative_config=spec_config("ngram", tiny, heads_file, disable_by_cost=switch),
              kv_cache_bytes=1 << 21)
    llm.engine.core.scheduler.speculation.num_spec_tokens = lambda request: 0  # every step plain
    assert isinstance(llm.engine.core.scheduler.speculation, SpeculationController)
    if deferred:
        llm.engine.executor.worker.batch.grammar_waits = lambda slots: True
    steps = []
    update = llm.engine.core.update
    llm.engine.core.update = lambda plan, result: steps.append((plan, result.cost)) or update(plan, result)
    outs = llm.generate(prompts[:2], params[:2], use_tqdm=False)
    assert [(o.token_ids, o.finish_reason) for o in outs] == references["overlapped"][0][:2]
    decodes = [cost for plan, cost in steps if plan.num_seqs and plan.num_tokens == plan.num_seqs]
    timed = [cost for cost in decodes if cost is not None]
    assert all(cost is None for plan, cost in steps if plan.num_tokens > plan.num_seqs)
    if not switch or deferred:
        assert not timed
        return
    assert len(decodes) > 2 * PLAIN_TIMING_EVERY and len(timed) == len(decodes) // PLAIN_TIMING_EVERY
    assert all(c.draft_s == 0 and c.forward_s > 0 and c.num_tokens == c.num_seqs for c in timed)


def test_draft_lengths_chosen_per_step_keep_the_tokens(tiny, heads_file, references, monkeypatch):
    """``adapt_length`` hands a request a different number of drafts from step to step; the
    draft model proposes exactly that many, and the tokens stay plain decoding's."""
    from flashserve.spec.controller import SpeculationController

    lengths = itertools.cycle([3, 1, 4, 2])
    monkeypatch.setattr(SpeculationController, "_adapts", lambda self, st: True)
    monkeypatch.setattr(SpeculationController, "_best_length", lambda self, st: (min(next(lengths), st.limit), 9.0))
    prompts, params = workload()
    llm = LLM(model=tiny, **BASE, speculative_config=spec_config("draft", tiny, heads_file, disable_by_cost=True),
              kv_cache_bytes=1 << 21)
    planned = []
    execute = llm.engine.executor.execute
    llm.engine.executor.execute = lambda plan: planned.extend(e.num_spec_tokens for e in plan.requests) or execute(plan)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [(o.token_ids, o.finish_reason) for o in outs] == references["overlapped"][0]
    assert {1, 2, 3, 4} <= set(planned)
    assert llm.engine.stats().spec.num_draft_tokens > 0


def test_sampling_with_speculation_runs_and_is_seeded(tiny, heads_file):
    """Random sampling with every filter and penalty goes through speculative sampling; a seeded
    request gives the same tokens twice."""
    prompts = [[5, 6, 7, 8] * 3, [9, 10, 11]]
    p = SamplingParams(temperature=0.8, top_k=30, top_p=0.9, min_p=0.02, repetition_penalty=1.2, seed=7,
                       max_tokens=24, ignore_eos=True, logprobs=1)
    for method in ("draft", "ngram"):
        spec = spec_config(method, tiny, heads_file)
        a = LLM(model=tiny, **BASE, speculative_config=spec).generate(prompts, p, use_tqdm=False)
        b = LLM(model=tiny, **BASE, speculative_config=spec).generate(prompts, p, use_tqdm=False)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        assert all(len(o.token_ids) == 24 and len(o.outputs[0].logprobs) == 24 for o in a)


def test_bad_configurations_are_clear_errors(tiny, heads_file, tmp_path):
    with pytest.raises(ValueError, match="speculative_config needs the key.s. num_speculative_tokens"):
        LLM(model=tiny, **BASE, speculative_config='{"method": "ngram"}')
    with pytest.raises(ValueError, match=r"num_speculative_tokens must be an integer in \[1, 16\]"):
        LLM(model=tiny, **BASE, speculative_config={"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(ValueError, match=r"in \[1, 16\]"):
        LLM(model=tiny, **BASE, speculative_config={"method": "ngram", "num_speculative_tokens": 17})
    with pytest.raises(ValueError, match=r"in \[1, 63\] for a token tree"):
        LLM(model=tiny, **BASE, speculative_config={"method": "ngram", "num_speculative_tokens": 64, "tree_width": 2})
    with pytest.raises(ValueError, match="unknown speculative_config key"):
        LLM(model=tiny, **BASE, speculative_config={"method": "ngram", "num_speculative_tokens": 2, "k": 3})
    with pytest.raises(ValueError, match="must be one of ngram, draft, layers, heads"):
        LLM(model=tiny, **BASE, speculative_config='{"method": "eagle", "num_speculative_tokens": 2}')
    with pytest.raises(ValueError, match="needs 'model'"):
        LLM(model=tiny, **BASE, speculative_config={"method": "draft", "num_speculative_tokens": 2})
    other = tmp_path / "other_vocab"
    import conftest_models

    old = dict(conftest_models._COMMON)
    conftest_models._COMMON["vocab_size"] = 384
    try:
        make_tiny_checkpoint("llama_mha_tied", other, seed=1)
    finally:
        conftest_models._COMMON.clear()
        conftest_models._COMMON.update(old)
    with pytest.raises(ValueError, match="vocabulary of 384 tokens, the target 512"):
        LLM(model=tiny, **BASE, speculative_config={"method": "draft", "model": str(other), "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match=r"num_layers' must be in \[1, 1\]"):
        LLM(model=tiny, **BASE, speculative_config={"method": "layers", "num_layers": 2, "num_speculative_tokens": 2})
    # heads trained for another model (same shapes, other weights): refused by fingerprint
    twin = tmp_path / "twin"
    make_tiny_checkpoint("llama3_gqa", twin, seed=7)
    with pytest.raises(ValueError, match="were trained for another model"):
        LLM(model=str(twin), **BASE, speculative_config={"method": "heads", "heads": heads_file,
                                                           "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="no drafting heads at"):
        LLM(model=tiny, **BASE, speculative_config={"method": "heads", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="exceeds the 3 heads"):
        LLM(model=tiny, **BASE, speculative_config={"method": "heads", "heads": heads_file, "num_speculative_tokens": 4})
    with pytest.raises(ValueError, match="num_speculative_tokens must be None"):
        SamplingParams(num_speculative_tokens=-1)
    gemma = tmp_path / "gemma3"  # every layer windowed: no block table a separate draft can use
    make_tiny_checkpoint("gemma3", gemma, seed=2)
    with pytest.raises(ValueError, match="'draft' needs a target with full-attention layers"):
        LLM(model=str(gemma), **BASE, attention="sliding", attention_window=16,
            speculative_config={"method": "draft", "model": str(gemma), "num_speculative_tokens": 2})
