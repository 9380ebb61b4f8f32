"""Token embedding and LM head (tied to the embedding or with its own weight).

Both take their storage from the quantization config in scope, like ``Linear``: the embedding
is dense or a packed GGUF table (rows dequantized on lookup); the LM head is a ``Linear`` whose
output is fp32. A tied head shares the embedding's parameter when both are dense; otherwise its
method builds its own kernel-ready weight from the embedding's loaded tensor at ``finalize``.

Under tensor parallelism both are vocabulary-parallel: rank ``r`` holds rows
``[r V/tp, (r+1) V/tp)``; the embedding zeroes the ids other ranks own and all-reduces, the head
all-gathers its logit columns (so every rank samples from the same full logits).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from flashserve.distributed.parallel_state import current_parallel, split_size
from flashserve.layers.linear import Linear
from flashserve.quant.base import LinearMethod, Partition, current_quant_config


class VocabEmbedding(nn.Module):
    """``input_ids [T] -> [T, hidden]``; ``vocab_size`` is this rank's rows (``V / tp``)."""

    def __init__(self, vocab_size: int, hidden_size: int, prefix: str = "model.embed_tokens") -> None:
        super().__init__()
        self.tp = current_parallel()
        self.vocab_size = split_size(vocab_size, self.tp.tp_size, "the vocabulary size")
        self.vocab_start = self.tp.tp_rank * self.vocab_size
        self.hidden_size = hidden_size
        self.prefix = prefix
        self.quant_method = current_quant_config().embedding_method(self)
        self.quant_method.create_weights(self)
        if self.tp.tp_size > 1:
            self.weight.weight_loader = self._shard_loader(self.weight.weight_loader)

    def _shard_loader(self, loader):
        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
            if loaded.shape[0] != self.vocab_size * self.tp.tp_size:
                raise ValueError(f"{self.prefix}: expected {self.vocab_size * self.tp.tp_size} rows, "
                                 f"got {tuple(loaded.shape)}")
            loader(param, loaded.narrow(0, self.vocab_start, self.vocab_size), shard_id)
        return load

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.tp_size == 1:
            return self.quant_method.embed(self, input_ids)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.vocab_size)  # [T]
        out = self.quant_method.embed(self, torch.where(mine, local, 0))  # [T, hidden]
        return self.tp.all_reduce(out * mine.unsqueeze(-1).to(out.dtype))


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
        self._setup(hidden_size, [Partition(None, 0, vocab_size, name)], False, prefix, tied=tied, parallel="column")
        if tied is not None:
            if type(self.quant_method) is LinearMethod:
                self.weight = tied.weight  # same Parameter object: loading one loads both
            else:
                # not a submodule (the embedding stays owned by the model); ``finalize_quantized``
                # hands this method the embedding's loaded tensor
                object.__setattr__(self, "tied_to", tied)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().forward(hidden).float()  # [N, V / tp]
        return self.tp.all_gather_last(logits) if self.parallel else logits

    @torch.no_grad()
    def dense_weight(self, rows_per_call: int = 128) -> torch.Tensor:
        """The fp32 ``[V, hidden]`` matrix the head multiplies by, whatever its storage: a dense
        head's weight; a packed one's products with the identity (the values its kernels use, as
        rounded by their output dtype: bf16 on the CPU)."""
        weight = getattr(self, "weight", None)
        if isinstance(weight, torch.Tensor):
            w = weight.detach().float()  # [V / tp, hidden]
            return self.tp.all_gather_last(w.t()).t() if self.parallel else w
        device = next(itertools.chain(self.buffers(), self.parameters())).device
        eye = torch.eye(self.in_features, dtype=torch.float32, device=device)
        cols = [self(eye[i : i + rows_per_call]) for i in range(0, self.in_features, rows_per_call)]
        return torch.cat(cols).t().contiguous()
