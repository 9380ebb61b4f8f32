"""Turns a scheduler plan into model inputs, runs the forward pass and samples.

Inputs for all scheduled requests are packed into one flat batch of T tokens (see
``flashserve.layers.attention_metadata``). Inputs are built on the host (pinned memory on CUDA)
and copied to the device without blocking; the only synchronisation in a step is reading back
the sampled token ids. Decode steps replay a captured CUDA graph when one is available.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from flashserve.layers.attention_metadata import AttentionMetadata, forward_context
from flashserve.layers.sampler import Sampler, SamplingRow
from flashserve.runner.cuda_graphs import DecodeGraphs
from flashserve.runner.swap import HostSwapSpace
from flashserve.sched.plan import RunnerOutput, SampledToken, ScheduledRequest, SchedulerOutput


@dataclass
class HostInputs:
    """One step's inputs as host lists (B sequences, T new tokens)."""

    input_ids: list[int]  # [T]
    positions: list[int]  # [T]
    slot_mapping: list[int]  # [T]
    query_start: list[int]  # [B + 1]
    query_lens: list[int]  # [B]
    seq_lens: list[int]  # [B]
    block_tables: list[list[int]]  # [B, W], padded with 0
    logits_indices: list[int]  # [S] last new token of each sampling request
    sample_rows: list[int]  # [S] plan index of each sampling request

    @property
    def is_decode(self) -> bool:
        return len(self.input_ids) == len(self.seq_lens)


@dataclass
class StepTiming:
    """Where one step's time went (recorded only when ``ModelRunner.timings`` is a list)."""

    num_tokens: int
    is_decode: bool
    host_s: float  # host time to build inputs and launch the forward pass
    step_s: float  # wall time of execute(), sampling and the read-back included
    gpu_ms: float | None  # device time from the forward's launch to the sampled ids (CUDA events)


class ModelRunner:
    """Owns the model, the KV pool and the sampler of one device."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_pool: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]
        block_size: int,
        device: torch.device,
        eos_token_ids: list[int],
        seed: int = 0,
    ) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.kv_caches = [(kv_pool[i, 0], kv_pool[i, 1]) for i in range(kv_pool.shape[0])]
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(device, seed)
        self._pin = device.type == "cuda"
        self.graphs: DecodeGraphs | None = None
        self.timings: list[StepTiming] | None = None  # set to [] to record per-step timings (benchmarks)
        self.swap_space: HostSwapSpace | None = None  # host blocks for swap preemption, set by the engine

    def capture_cuda_graphs(self, max_batch: int, max_model_len: int) -> float:
        """Capture decode graphs for batch sizes up to ``max_batch``; returns the seconds taken."""
        max_blocks = -(-max_model_len // self.block_size)
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.device, max_batch, max_blocks,
                                   max_model_len, self.block_size)
        return self.graphs.capture()

    def _host(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, pin_memory=self._pin)

    def _to_device(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return self._host(data, dtype).to(self.device, non_blocking=True)

    def host_inputs(self, plan: SchedulerOutput) -> HostInputs:
        bs = self.block_size
        h = HostInputs([], [], [], [0], [], [], [], [], [])
        width = max(len(r.block_ids) for r in plan.requests)
        for i, r in enumerate(plan.requests):
            n = r.num_new_tokens
            h.input_ids.extend(r.token_ids)
            pos = range(r.start_pos, r.start_pos + n)
            h.positions.extend(pos)
            blocks = r.block_ids
            h.slot_mapping.extend(blocks[p // bs] * bs + p % bs for p in pos)
            h.query_start.append(h.query_start[-1] + n)
            h.query_lens.append(n)
            h.seq_lens.append(r.seq_len)
            h.block_tables.append(blocks + [0] * (width - len(blocks)))
            if r.sample:
                h.logits_indices.append(h.query_start[-1] - 1)
                h.sample_rows.append(i)
        return h

    def metadata(self, h: HostInputs) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self._to_device(h.query_start, torch.int32),
            seq_lens=self._to_device(h.seq_lens, torch.int32),
            block_tables=self._to_device(h.block_tables, torch.int32),
            slot_mapping=self._to_device(h.slot_mapping, torch.int64),
            max_query_len=max(h.query_lens),
            max_seq_len=max(h.seq_lens),
            query_lens_cpu=h.query_lens,
            seq_lens_cpu=h.seq_lens,
            block_size=self.block_size,
            is_decode=h.is_decode,
        )

    def forward(self, h: HostInputs) -> torch.Tensor:
        """Hidden states [T, hidden] of every new token (a graph replay for decode when possible)."""
        graphs = self.graphs
        if graphs is not None and h.is_decode and len(h.seq_lens) <= graphs.max_batch:
            return graphs.run(
                self._host(h.input_ids, torch.int64),
                self._host(h.positions, torch.int64),
                self._host(h.slot_mapping, torch.int64),
                self._host(h.seq_lens, torch.int32),
                self._host(h.block_tables, torch.int32),
            )
        meta = self.metadata(h)
        with forward_context(meta):
            return self.model(self._to_device(h.input_ids, torch.int64), self._to_device(h.positions, torch.int64),
                              self.kv_caches)

    @torch.inference_mode()
    def score_chunk(self, token_ids: list[int], start_pos: int, block_ids: list[int]) -> torch.Tensor:
        """Log-probabilities [n, V] (fp32, on the device) of the token after each of ``token_ids``,
        which sit at positions ``start_pos ...`` of a sequence whose K/V before ``start_pos`` is in
        ``block_ids``; their own K/V is written to the cache (so a later chunk reads it back)."""
        from flashserve.sampling_params import SamplingParams

        entry = ScheduledRequest("score", list(token_ids), start_pos, list(block_ids), False, SamplingParams())
        h = self.host_inputs(SchedulerOutput(requests=[entry]))
        meta = self.metadata(h)
        with forward_context(meta):
            hidden = self.model(self._to_device(h.input_ids, torch.int64), self._to_device(h.positions, torch.int64),
                                self.kv_caches)
        return self.model.compute_logits(hidden).log_softmax(dim=-1)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        if plan.block_copies:  # swap preemption moves (flashserve.runner.swap), before the forward
            from flashserve.runner.swap import apply_block_copies

            apply_block_copies(self.kv_pool, self.swap_space, plan.block_copies)
        if not plan.requests:
            return RunnerOutput(sampled={})
        t0 = time.perf_counter()
        h = self.host_inputs(plan)
        if self.timings is not None and self._pin:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        hidden = self.forward(h)
        host_s = time.perf_counter() - t0  # building inputs and launching the forward; no sync yet
        if not h.sample_rows:
            return RunnerOutput(sampled={})
        logits = self.model.compute_logits(hidden[self._to_device(h.logits_indices, torch.int64)])
        rows = [plan.requests[i] for i in h.sample_rows]
        out = self.sampler(
            logits,
            [SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, self.eos_token_ids) for r in rows],
        )
        if self.timings is not None:
            gpu_ms = None
            if self._pin:
                end.record()
                end.synchronize()
                gpu_ms = start.elapsed_time(end)
            self.timings.append(StepTiming(len(h.input_ids), h.is_decode, host_s, time.perf_counter() - t0, gpu_ms))
        return RunnerOutput(
            sampled={
                r.request_id: SampledToken(out.token_ids[j], out.logprobs[j], out.top_logprobs[j])
                for j, r in enumerate(rows)
            }
        )
