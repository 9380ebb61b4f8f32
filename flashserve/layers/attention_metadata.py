"""The contract between the runner and the attention layers.

One step computes N new tokens for each scheduled sequence (a prompt chunk, one decode token,
or 1 + k speculative tokens). All sequences' new tokens are packed into one flat batch of
``T = sum(query_lens)`` tokens. The runner builds an ``AttentionMetadata`` per step and installs
it with ``forward_context(meta)``; each attention layer reads it with ``get_forward_context()``.

Paged KV cache layout (per layer): ``k_cache``/``v_cache`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``. Token ``j`` of a sequence lives in block
``block_tables[i, j // block_size]`` at offset ``j % block_size``; its flat slot index is
``block * block_size + offset``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Per-step attention inputs (all tensors on the model's device).

    Shapes: B = number of sequences, T = number of new tokens in the step.
    """

    query_start_loc: torch.Tensor  # [B + 1] int32, cumulative new-token counts (starts at 0)
    seq_lens: torch.Tensor  # [B] int32, tokens in context after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, padded with 0 past the sequence
    slot_mapping: torch.Tensor  # [T] int64, flat cache slot of each new token (-1 = do not store)
    max_query_len: int
    max_seq_len: int
    # Host copies, so the torch backend and the kernel launchers never synchronise the device.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int
    # True when every sequence has exactly one new token (a pure decode step).
    is_decode: bool = False
    # Values a backend derives from this metadata once per step and reuses in every layer.
    memo: dict = field(default_factory=dict)
    # Models with several groups of layers (flashserve.cache.kv_groups): the metadata of groups
    # 1, 2, ... (their own block tables and slot mappings); a layer of group g > 0 reads groups[g - 1].
    groups: tuple[AttentionMetadata, ...] = ()

    def for_group(self, group: int) -> AttentionMetadata:
        return self if group == 0 else self.groups[group - 1]
    # Per-request attention options (flashserve.layers.request_attention): per sequence, the spec
    # that replaces full attention in the layers the engine runs fully (None: the layer's own).
    # None: no request of the step asks for one.
    seq_attention: tuple[Any, ...] | None = None
    # Token trees of a speculative verification step (flashserve.kernels.tree_attention.TreeMask):
    # their new tokens attend to their ancestors only. None: every sequence is causal.
    tree: Any = None
    # Sequences (indices) whose new tokens verify speculative drafts: the torch backend attends each
    # of those tokens as its own one-token decode step would (flashserve.layers.attention_rows), so
    # verified logits equal plain decoding's bit for bit. Other backends ignore it.
    verify_seqs: frozenset[int] = frozenset()

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens_cpu))


_CURRENT: list[AttentionMetadata] = []


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    """Make ``meta`` visible to attention layers for the duration of one forward pass."""
    _CURRENT.append(meta)
    try:
        yield meta
    finally:
        _CURRENT.pop()


def get_forward_context() -> AttentionMetadata:
    if not _CURRENT:
        raise RuntimeError("attention layer called outside forward_context(); the runner must install metadata")
    return _CURRENT[-1]


class AttentionBackend:
    """What an attention implementation provides. Chosen once by the runner, used by every layer.

    Implementations: ``flashserve.layers.attention.TorchAttentionBackend`` (CPU and the
    reference) and ``flashserve.kernels.triton_backend.TritonAttentionBackend`` (GPU).
    """

    name: str = "abstract"
    attention_kinds: tuple[str, ...] = ("full",)  # AttentionSpec kinds this backend implements

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim], new tokens only
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        spec: Any = None,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Store the new k/v at ``meta.slot_mapping``, then attend causally over each sequence's
        context (cached tokens followed by the new ones) as the layer's ``AttentionSpec`` says
        (None: full attention)."""
        raise NotImplementedError
