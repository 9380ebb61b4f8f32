"""Token embedding and LM head (tied to the embedding or with its own weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.layers.linear import default_weight_loader


class VocabEmbedding(nn.Module):
    """``input_ids [T] -> [T, hidden]``. Whole vocabulary on one device (room for TP later)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """``hidden [N, hidden] -> logits [N, vocab]`` (fp32).

    With ``tied=embedding`` the head shares the embedding's weight parameter.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tied: VocabEmbedding | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.tied = tied is not None
        if tied is not None:
            self.weight = tied.weight  # same Parameter object: loading one loads both
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
            self.weight.weight_loader = default_weight_loader

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight).float()
