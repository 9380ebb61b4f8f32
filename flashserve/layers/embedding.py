"""Token embedding and LM head (tied to the embedding or with its own weight).

Both take their storage from the quantization config in scope, like ``Linear``: the embedding
is dense or a packed GGUF table (rows dequantized on lookup); the LM head is a ``Linear`` whose
output is fp32. A tied head shares the embedding's parameter when both are dense; otherwise its
method builds its own kernel-ready weight from the embedding's loaded tensor at ``finalize``.
"""

from __future__ import annotations

import torch
from torch import nn

from flashserve.layers.linear import Linear
from flashserve.quant.base import LinearMethod, Partition, current_quant_config


class VocabEmbedding(nn.Module):
    """``input_ids [T] -> [T, hidden]``. Whole vocabulary on one device (room for TP later)."""

    def __init__(self, vocab_size: int, hidden_size: int, prefix: str = "model.embed_tokens") -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.prefix = prefix
        self.quant_method = current_quant_config().embedding_method(self)
        self.quant_method.create_weights(self)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.quant_method.embed(self, input_ids)


class LMHead(Linear):
    """``hidden [N, hidden] -> logits [N, vocab]`` (fp32).

    With ``tied=embedding`` the head reads the embedding's checkpoint tensor: a dense head
    shares the embedding's weight parameter (loading one loads both).
    """

    def __init__(self, vocab_size: int, hidden_size: int, tied: VocabEmbedding | None = None,
                 prefix: str = "lm_head") -> None:
        nn.Module.__init__(self)
        self.vocab_size = vocab_size
        self.tied = tied is not None
        name = tied.prefix if tied is not None else prefix  # a tied head is stored as the embedding
        self._setup(hidden_size, [Partition(None, 0, vocab_size, name)], False, prefix, tied=tied)
        if tied is not None:
            if type(self.quant_method) is LinearMethod:
                self.weight = tied.weight  # same Parameter object: loading one loads both
            else:
                # not a submodule (the embedding stays owned by the model); ``finalize_quantized``
                # hands this method the embedding's loaded tensor
                object.__setattr__(self, "tied_to", tied)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden).float()
