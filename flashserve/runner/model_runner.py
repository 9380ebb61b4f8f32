"""Turns a scheduler plan into model inputs, runs the forward pass and samples.

Inputs for all scheduled requests are packed into one flat batch of T tokens (see
``flashserve.layers.attention_metadata``). Inputs are built on the host and copied to the device
in one non-blocking transfer each; the only synchronisation in a step is reading back the
sampled token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashserve.layers.attention_metadata import AttentionMetadata, forward_context
from flashserve.layers.sampler import Sampler, SamplingRow
from flashserve.sched.plan import RunnerOutput, SampledToken, SchedulerOutput


@dataclass
class StepInputs:
    """Device tensors and metadata for one forward pass."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64, index of the last new token of each sampling request
    sample_rows: list[int]  # plan indices of the requests that sample


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

    def _to_device(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype, pin_memory=self._pin)
        return t.to(self.device, non_blocking=True)

    def prepare(self, plan: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        query_lens: list[int] = []
        logits_idx: list[int] = []
        sample_rows: list[int] = []
        max_blocks = max(len(r.block_ids) for r in plan.requests)
        tables: list[list[int]] = []
        for i, r in enumerate(plan.requests):
            n = r.num_new_tokens
            input_ids.extend(r.token_ids)
            pos = range(r.start_pos, r.start_pos + n)
            positions.extend(pos)
            blocks = r.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in pos)
            query_start.append(query_start[-1] + n)
            seq_lens.append(r.seq_len)
            query_lens.append(n)
            tables.append(blocks + [0] * (max_blocks - len(blocks)))
            if r.sample:
                logits_idx.append(query_start[-1] - 1)
                sample_rows.append(i)
        meta = AttentionMetadata(
            query_start_loc=self._to_device(query_start, torch.int32),
            seq_lens=self._to_device(seq_lens, torch.int32),
            block_tables=self._to_device(tables, torch.int32),
            slot_mapping=self._to_device(slots, torch.int64),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            block_size=bs,
            is_decode=all(q == 1 for q in query_lens),
        )
        return StepInputs(
            input_ids=self._to_device(input_ids, torch.int64),
            positions=self._to_device(positions, torch.int64),
            meta=meta,
            logits_indices=self._to_device(logits_idx, torch.int64),
            sample_rows=sample_rows,
        )

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        if plan.block_copies:  # swap preemption moves (flashserve.runner.swap), before the forward
            from flashserve.runner.swap import apply_block_copies

            apply_block_copies(self.kv_pool, getattr(self, "swap_space", None), plan.block_copies)
        if not plan.requests:
            return RunnerOutput(sampled={})
        inputs = self.prepare(plan)
        hidden = self.forward(inputs)
        if not inputs.sample_rows:
            return RunnerOutput(sampled={})
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        rows = [plan.requests[i] for i in inputs.sample_rows]
        out = self.sampler(
            logits,
            [SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, self.eos_token_ids) for r in rows],
        )
        return RunnerOutput(
            sampled={
                r.request_id: SampledToken(out.token_ids[j], out.logprobs[j], out.top_logprobs[j])
                for j, r in enumerate(rows)
            }
        )

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [T, hidden] of every new token."""
        with forward_context(inputs.meta):
            return self.model(inputs.input_ids, inputs.positions, self.kv_caches)
