"""Swap and recompute preemption: blocks come back bit-identical, the scheduler falls back to
recompute when the host space is full, and under a pool too small for the load every request
finishes with the same greedy output as an unconstrained run (tiny model, CPU)."""

import random

import pytest
import torch

from flashserve.cache.block_manager import BlockManager
from flashserve.config import SchedulerConfig
from flashserve.request import Request, RequestStatus
from flashserve.sampling_params import SamplingParams
from flashserve.sched.plan import BlockCopy
from sched_testing import apply_tokens
from flashserve.sched.policy import FCFSPolicy
from flashserve.sched.preemption import PreemptionCostModel
from flashserve.sched.scheduler import Scheduler
from flashserve.runner.swap import HostSwapSpace, apply_block_copies


def test_swapped_blocks_come_back_bit_identical():
    pool = torch.randn(2, 2, 8, 4, 2, 16)
    original = pool.clone()
    swap = HostSwapSpace(pool, num_host_blocks=5)
    apply_block_copies(pool, swap, BlockCopy(swap_out=[(1, 4), (6, 0), (3, 2)]))
    pool[:, :, [1, 3, 6]] = float("nan")  # the device blocks get reused by someone else
    apply_block_copies(pool, swap, BlockCopy(swap_in=[(4, 7), (0, 2), (2, 5)]))
    assert torch.equal(pool[:, :, 7], original[:, :, 1])
    assert torch.equal(pool[:, :, 2], original[:, :, 6])
    assert torch.equal(pool[:, :, 5], original[:, :, 3])
    # Same step: a block freed by a swap-out is read before a swap-in overwrites it.
    pool2 = original.clone()
    apply_block_copies(pool2, swap, BlockCopy(swap_out=((0, 1),), swap_in=((4, 0),)))
    assert torch.equal(swap.blocks[1], original[:, :, 0])
    assert torch.equal(pool2[:, :, 0], original[:, :, 1])
    # Runs of consecutive host blocks move with one copy each, in and out.
    runs = HostSwapSpace(original, num_host_blocks=6)
    apply_block_copies(original.clone(), runs, BlockCopy(swap_out=((2, 3), (5, 4), (7, 5), (0, 0))))
    back = torch.full_like(original, float("nan"))
    apply_block_copies(back, runs, BlockCopy(swap_in=((3, 6), (4, 1), (5, 0), (0, 2))))
    for dev, src in ((6, 2), (1, 5), (0, 7), (2, 0)):
        assert torch.equal(back[:, :, dev], original[:, :, src])
    assert swap.blocks.shape == (5, 2, 2, 4, 2, 16) and HostSwapSpace.bytes_per_block(pool) == 2 * 2 * 4 * 2 * 16 * 4


def _sched(num_blocks, host, mode="swap", block_size=2):
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, preemption_mode=mode)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, num_host_blocks=host), FCFSPolicy(), max_model_len=64)


def _step(s):
    plan = s.schedule()
    apply_tokens(s, plan, 7)
    s.block_manager.check_invariants()
    return plan


def _req(rid, n, t, max_tokens=4):  # 4 + 4 tokens: alone, a request fits the 4-block pool
    return Request(rid, list(range(1, n + 1)), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                   [0], arrival_time=t)


def test_swap_out_then_in_keeps_computed_tokens():
    s = _sched(num_blocks=4, host=4)
    s.add_request(_req("a", 4, 0))
    s.add_request(_req("b", 4, 1))
    _step(s)
    plan = _step(s)  # a grows to a 3rd block: b (last in FCFS order) is swapped out
    assert plan.preempted_ids == ("b",) and plan.block_copies.swap_out == ((2, 0), (3, 1))
    b = s.requests["b"]
    assert b.status == RequestStatus.SWAPPED and b.num_computed_tokens == 4 and s.num_swap_outs == 1
    while "a" in s.requests:
        _step(s)
    plan = _step(s)
    assert plan.block_copies.swap_in and [r.request_id for r in plan.requests] == ["b"]
    assert plan.requests[0].start_pos == 4 and plan.requests[0].num_new_tokens == 1  # no recompute


def test_full_host_space_falls_back_to_recompute():
    s = _sched(num_blocks=4, host=1)
    s.add_request(_req("a", 4, 0))
    s.add_request(_req("b", 4, 1))
    _step(s)
    plan = _step(s)
    assert plan.preempted_ids == ("b",) and not plan.block_copies
    assert s.requests["b"].status == RequestStatus.WAITING and s.num_recomputes == 1


def test_auto_mode_cost_model_prefers_swap_for_long_contexts():
    from flashserve.config import ModelConfig

    qwen3_06b = ModelConfig("qwen3", 151936, 1024, 3072, 28, 16, 8, 128, 40960)
    cm = PreemptionCostModel.for_model(qwen3_06b, 2, "cuda")
    # A small model with a large KV per parameter: recompute is cheaper until ~10k tokens.
    assert not cm.prefer_swap(16) and not cm.prefer_swap(4096) and cm.prefer_swap(16384)
    assert not cm.prefer_swap(0)
    llama_8b = ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128, 131072)
    assert PreemptionCostModel.for_model(llama_8b, 2, "cuda").prefer_swap(16)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from conftest_models import make_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny_swap")
    make_tiny_checkpoint("llama3_gqa", folder, seed=4)
    return str(folder)


@pytest.mark.parametrize("mode,swap_bytes", [("recompute", 0), ("swap", 1 << 20), ("swap", 8 * 2048), ("auto", 1 << 20)])
def test_small_pool_finishes_everything_with_unconstrained_outputs(tiny_model, mode, swap_bytes):
    from flashserve.engine.llm import LLM

    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(10, 40))] for _ in range(6)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def run(**kw):
        # device="cpu": the byte budgets below assume fp32 blocks of 2048 bytes.
        llm = LLM(model=tiny_model, device="cpu", max_model_len=128, block_size=4, verbose=False,
                  enable_prefix_caching=False, max_num_batched_tokens=48, **kw)
        return [o.token_ids for o in llm.generate(prompts, sp, use_tqdm=False)], llm

    ref, _ = run(kv_cache_bytes=1 << 21)
    got, llm = run(kv_cache_bytes=34 * 2048, preemption_mode=mode, swap_space_bytes=swap_bytes)  # 34 blocks
    sched = llm.engine.scheduler
    assert got == ref
    assert sched.num_preemptions > 0
    if mode == "swap":
        assert sched.num_swap_outs > 0
        assert (sched.num_recomputes > 0) == (swap_bytes < 1 << 20)  # a tiny host space overflows
    if mode == "recompute":
        assert sched.num_swap_outs == 0
