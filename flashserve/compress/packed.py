"""Run a flashserve model on whole sequences without a KV cache (calibration and training).

The engine's runner always has a paged cache; the compression tools instead push B complete
sequences packed into one flat batch of T tokens through the model (or one decoder layer) with
metadata that stores nothing and lets each sequence attend causally over itself. Only the torch
attention backend runs that way (SDPA, differentiable), so models for these tools are built
with it (``load_for_tools``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from flashserve.layers.attention_metadata import AttentionMetadata, forward_context


def no_cache_metadata(lengths: Sequence[int], device: torch.device) -> AttentionMetadata:
    """Metadata for B whole sequences of ``lengths`` packed back to back, with no KV cache."""
    lens = [int(n) for n in lengths]
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros(len(lens), 0, dtype=torch.int32, device=device),
        slot_mapping=torch.full((starts[-1],), -1, dtype=torch.int64, device=device),
        max_query_len=max(lens),
        max_seq_len=max(lens),
        query_lens_cpu=lens,
        seq_lens_cpu=lens,
        block_size=1,
    )


def packed_inputs(seqs: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [T], positions [T]) of sequences packed back to back."""
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64, device=device)
    pos = torch.cat([torch.arange(len(s), dtype=torch.int64) for s in seqs]).to(device)
    return ids, pos


@contextlib.contextmanager
def packed(seqs: Sequence[Sequence[int]], device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Install no-cache metadata for ``seqs`` and yield their (input_ids, positions)."""
    with forward_context(no_cache_metadata([len(s) for s in seqs], device)):
        yield packed_inputs(seqs, device)


def packed_logits(model: torch.nn.Module, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """fp32 logits [T, V] of every position of the packed sequences (grad flows if enabled)."""
    device = next(model.parameters()).device
    with packed(seqs, device) as (ids, pos):
        hidden = model(ids, pos, None)  # [T, hidden]
    return model.compute_logits(hidden)
