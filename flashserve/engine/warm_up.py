"""Warm start: synthetic steps that make the Worker compile every kernel variant before serving.

Triton specialises a kernel on its integer arguments (== 1, divisible by 16, other), so the
first step of each shape class pays a JIT compile (seconds with a cold cache); CUDA graphs
capture the decode and small mixed shapes at start, but eager steps do not. ``warm_up_plans``
builds plans that hit each class once: prompts of 1, 16, 17 and (past the graphs) a few hundred
tokens, a mixed prompt + decode step, a decode step, and every sampler path (greedy, seeded
top-k/top-p/min-p, penalties, logprobs). They use pool blocks while the pool is still empty and
drop every synthetic request at the end. ``triton_cache_state`` tells a benchmark whether the
compiles it pays come from a cold cache.

Token-tree verification runs eagerly past the tree graphs' sizes; the captured graphs compile
the classes 1, 2, 4, 8, 16 (the GGUF GEMV's rows) and 16, 24, 32 ..., but no 9-15-token step.
The quantized products' kernels (``quant_gguf``, ``quant_gemm``) therefore do not specialise on
the row count (``do_not_specialize``): the 16-token graph's compile serves them (H200: after 16
rows, 11 and 9 rows compiled no new variant; one each before).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from flashserve.sampling_params import SamplingParams
from flashserve.sched.plan import NewRequest, ScheduledRequest, SchedulerOutput

SAMPLER_VARIANTS = (
    SamplingParams(temperature=0.0, max_tokens=4),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, seed=1, max_tokens=4),
    SamplingParams(temperature=1.0, repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.3, max_tokens=4),
    SamplingParams(temperature=0.0, logprobs=5, max_tokens=4),
)


def triton_cache_state() -> str:
    """"cold" when Triton's kernel cache holds nothing yet (every kernel will be compiled), else "warm"."""
    folder = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return "warm" if folder.is_dir() and any(folder.iterdir()) else "cold"


def warm_up_plans(num_blocks: int, block_size: int, vocab_size: int, max_tokens_per_step: int,
                  max_model_len: int, max_mixed_graph_tokens: int) -> list[SchedulerOutput]:
    """Plans to execute in order (each one's result read before the next); see the module docstring."""
    rng = random.Random(0)
    limit = min(max_tokens_per_step, max_model_len - 2)
    lengths = sorted({n for n in (1, 16, 17, max_mixed_graph_tokens + 1, 2 * max_mixed_graph_tokens + 17) if n <= limit})
    plans: list[SchedulerOutput] = []
    next_block = 0
    step = -1

    def blocks(n_tokens: int) -> tuple[int, ...]:
        nonlocal next_block
        n = -(-n_tokens // block_size)
        ids = tuple(b % num_blocks for b in range(next_block, next_block + n))
        next_block += n
        return ids

    ids: list[str] = []
    for i, n in enumerate(lengths):
        rid = f"__warmup_{i}"
        ids.append(rid)
        params = SAMPLER_VARIANTS[i % len(SAMPLER_VARIANTS)]
        prompt = tuple(rng.randrange(vocab_size) for _ in range(n))
        plans.append(SchedulerOutput(step, (ScheduledRequest(rid, 0, n, blocks(n + 1), True),),
                                     (NewRequest(rid, prompt, (), params),)))
        step -= 1
    # Every sampler path in one step, then a mixed step (a prompt chunk beside decodes).
    new, work = [], []
    for j, params in enumerate(SAMPLER_VARIANTS):
        rid = f"__warmup_s{j}"
        ids.append(rid)
        new.append(NewRequest(rid, (rng.randrange(vocab_size), rng.randrange(vocab_size)), (), params))
        work.append(ScheduledRequest(rid, 0, 2, blocks(4), True))
    plans.append(SchedulerOutput(step, tuple(work), tuple(new)))
    step -= 1
    n = min(16, limit)
    mixed = [ScheduledRequest(w.request_id, 2, 1, (), True) for w in work]
    rid = "__warmup_mixed"
    ids.append(rid)
    mixed.append(ScheduledRequest(rid, 0, n, blocks(n + 1), True))
    plans.append(SchedulerOutput(step, tuple(mixed), (NewRequest(rid, tuple(range(1, n + 1)), (), SAMPLER_VARIANTS[0]),)))
    step -= 1
    plans.append(SchedulerOutput(step, tuple(ScheduledRequest(w.request_id, 3, 1, (), True) for w in work)))
    step -= 1
    plans.append(SchedulerOutput(step, (), finished_ids=tuple(ids)))
    return plans
