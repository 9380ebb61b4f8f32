"""When to preempt by swapping instead of recomputing: a two-line cost model. Pure Python.

Recomputing a victim with ``n`` computed tokens costs one prefill of ``n`` tokens:
``n * 2 * params`` FLOPs for the weights plus ``n**2 / 2`` causal query-key pairs at
``4 * layers * heads * head_dim`` FLOPs each (QK^T and PV), at ``device_flops`` sustained.
Swapping costs moving its KV out and back: ``2 * n * kv_bytes_per_token`` over
``swap_bandwidth`` (host <-> device copy). ``auto`` swaps when that copy is cheaper. Both terms
are linear in ``n`` except attention, so recompute wins for short contexts and swap for long
ones. With the defaults below, Qwen3-0.6B (small, with a large KV per parameter) recomputes
below ~10k tokens and swaps above; Llama-3.1-8B always swaps (its weights cost ~6x more per
token to recompute than its KV costs to copy).

The constants are deliberately round, documented guesses (no calibration run at start-up):
CUDA: 200 TFLOP/s sustained bf16 prefill, 20 GB/s pinned PCIe copies; CPU: 50 GFLOP/s,
5 GB/s memcpy.

Rank preemption (a queued request outranks a running one, see ``RankPreemptionRule``) is
optional, unlike a preemption forced by a full pool, so it must not destroy work: its victims
are swapped whenever the mode allows it and the host space holds them, whatever the cost model
says (FastServe swaps proactively), and are recomputed only when that is nearly free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flashserve.config import ModelConfig
from flashserve.request import Request

DEVICE_FLOPS = {"cuda": 200e12, "cpu": 50e9}
SWAP_BANDWIDTH = {"cuda": 20e9, "cpu": 5e9}


@dataclass
class PreemptionCostModel:
    flops_per_token: float  # 2 x parameters
    attn_flops_per_pair: float  # per (query, key) pair, all layers
    kv_bytes_per_token: float
    device_flops: float
    swap_bandwidth: float

    def recompute_seconds(self, num_tokens: int) -> float:
        n = num_tokens
        return (n * self.flops_per_token + n * n / 2 * self.attn_flops_per_pair) / self.device_flops

    def swap_seconds(self, num_tokens: int) -> float:
        return 2 * num_tokens * self.kv_bytes_per_token / self.swap_bandwidth

    def prefer_swap(self, num_tokens: int) -> bool:
        return num_tokens > 0 and self.swap_seconds(num_tokens) < self.recompute_seconds(num_tokens)

    @classmethod
    def for_model(cls, mc: ModelConfig, dtype_bytes: int, device_type: str) -> PreemptionCostModel:
        h, q, kv = mc.hidden_size, mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * mc.intermediate_size
        params = mc.num_layers * per_layer + mc.vocab_size * h
        return cls(
            flops_per_token=2.0 * params,
            attn_flops_per_pair=4.0 * mc.num_layers * q,
            kv_bytes_per_token=2.0 * mc.num_layers * kv * dtype_bytes,
            device_flops=DEVICE_FLOPS.get(device_type, DEVICE_FLOPS["cpu"]),
            swap_bandwidth=SWAP_BANDWIDTH.get(device_type, SWAP_BANDWIDTH["cpu"]),
        )


@dataclass
class RankPreemptionRule:
    """When a running request may be preempted because a queued request outranks it.

    This is separate from the policy (which only ranks) and from the memory path (a full pool
    still preempts as before). A running request is an eligible victim only if

    * it has run for at least ``min_run_steps`` steps since it was last admitted or resumed
      (hysteresis: a job just brought back is not thrown out again, so jobs cannot thrash), and
    * preempting it keeps its work: it can be swapped (``preemption_mode`` is not
      ``recompute``, the host space holds its blocks, and it has at most ``max_swap_tokens``
      computed tokens (``None``: one step's token budget), since copying a long context out and
      back in blocks the GPU for longer than the outranking job gains), or else it has at most
      ``max_recompute_tokens`` computed tokens (``None``: an eighth of the step's token budget),
      so its recompute costs a fraction of one step.

    The protection doubles with each preemption the request has suffered (``backoff``), and no
    request is rank-preempted more than ``max_per_request`` times (``None``: no cap): a
    size-based policy may overtake a long job, but cannot keep throwing it out. At most
    ``max_per_step`` requests are rank-preempted per step, and none at all unless the chosen
    victims actually free the seat and blocks that the outranking request needs.
    """

    max_per_step: int = 1
    min_run_steps: int = 8
    max_recompute_tokens: int | None = None
    max_swap_tokens: int | None = None
    backoff: bool = True
    max_per_request: int | None = 2

    def protected_steps(self, num_preemptions: int) -> int:
        """Steps a request runs after its admission before it may be rank-preempted: doubled
        for each preemption it has already suffered (``backoff``), so a long job is preempted
        O(log length) times at most instead of at every arrival of a shorter one."""
        if not self.backoff:
            return self.min_run_steps
        return self.min_run_steps << min(num_preemptions, 16)

    def may_preempt(self, num_preemptions: int, steps_run: int) -> bool:
        """Whether a request that has run ``steps_run`` steps since its last admission may be
        rank-preempted (the swap / recompute-cost condition is checked by the scheduler)."""
        if self.max_per_request is not None and num_preemptions >= self.max_per_request:
            return False
        return steps_run >= self.protected_steps(num_preemptions)

    def swap_limit(self, max_num_batched_tokens: int) -> int:
        return self.max_swap_tokens if self.max_swap_tokens is not None else max_num_batched_tokens

    def recompute_limit(self, max_num_batched_tokens: int) -> int:
        if self.max_recompute_tokens is not None:
            return self.max_recompute_tokens
        return max_num_batched_tokens // 8

    def select(
        self,
        need_blocks: int,
        free_seats: int,
        free_blocks: int,
        host_free_blocks: int,
        candidates: Sequence[tuple[Request, int, int]],
        max_num_batched_tokens: int,
    ) -> list[tuple[Request, bool]]:
        """The running requests to preempt for a queued request that needs ``need_blocks``
        blocks and a seat, as (victim, swap it) pairs; [] when it fits already or when no
        choice within the rule makes room for it.

        ``candidates``: (request, blocks it holds, steps run since its admission) for the running
        requests the queued one outranks, lowest-ranked first. ``host_free_blocks`` is 0 when
        swapping is not allowed. Block counts of shared prefix blocks are an upper bound.
        """
        if free_seats > 0 and need_blocks <= free_blocks:
            return []
        recompute_limit = self.recompute_limit(max_num_batched_tokens)
        swap_limit = self.swap_limit(max_num_batched_tokens)
        victims: list[tuple[Request, bool]] = []
        for victim, blocks, steps_run in candidates:
            if len(victims) >= self.max_per_step:
                return []
            if not self.may_preempt(victim.metrics.num_preemptions, steps_run):
                continue  # (re)admitted too recently: let it run, no thrash
            swap = 0 < blocks <= host_free_blocks and victim.num_computed_tokens <= swap_limit
            if not swap and victim.num_computed_tokens > recompute_limit:
                continue  # would destroy too much work
            host_free_blocks -= blocks if swap else 0
            victims.append((victim, swap))
            free_seats, free_blocks = free_seats + 1, free_blocks + blocks
            if free_seats > 0 and need_blocks <= free_blocks:
                return victims
        return []
