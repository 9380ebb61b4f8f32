"""Which shard of the model this process holds, and the collectives its layers call.

A rank's ``ParallelContext`` is installed with ``parallel_scope`` while its model is built (like
``flashserve.quant.quant_scope``): the tensor-parallel layers (``flashserve.layers.linear``,
``flashserve.layers.embedding``) read it at construction to size their shard and keep its
process group for their all-reduce / all-gather. Outside a scope everything is one rank, and
the layers are the plain single-device ones.

Groups are plain ``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL`` (CUDA) objects built on a
``TCPStore`` (``flashserve.distributed.executor``); no global default group is created, so
several engines can live in one process one after the other.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place: ``tp_rank`` of ``tp_size`` within its tensor-parallel group."""

    tp_rank: int = 0
    tp_size: int = 1
    tp_group: dist.ProcessGroup | None = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the tensor-parallel group, in place (returns ``t``)."""
        if self.tp_size > 1:
            self.tp_group.allreduce([t]).wait()
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """``[N, k]`` shards -> ``[N, k * tp_size]``, rank order along the last dim."""
        if self.tp_size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.tp_size)]
        self.tp_group.allgather([parts], [t]).wait()
        return torch.cat(parts, dim=-1)

    def all_reduce_min(self, value: int) -> int:
        """The smallest ``value`` over the group (ranks agree on a KV pool size)."""
        if self.tp_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        if self.tp_group.name() == "nccl":  # NCCL reduces device tensors only
            t = t.cuda()
        self.tp_group.allreduce([t], opts).wait()
        return int(t.item())


_CONTEXT: contextvars.ContextVar[ParallelContext] = contextvars.ContextVar(
    "flashserve_parallel_context", default=ParallelContext())


def current_parallel() -> ParallelContext:
    """The context of the model being built (a single rank outside ``parallel_scope``)."""
    return _CONTEXT.get()


@contextlib.contextmanager
def parallel_scope(ctx: ParallelContext) -> Iterator[ParallelContext]:
    """Install ``ctx`` for the layers constructed inside the block."""
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def split_size(total: int, parts: int, what: str) -> int:
    """``total // parts``, or a ValueError naming what does not divide."""
    if total % parts:
        raise ValueError(f"tensor_parallel_size={parts} does not divide {what} ({total})")
    return total // parts


def kv_head_split(num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """(KV heads per rank, number of distinct KV shards). With fewer KV heads than ranks each
    head is replicated on ``tp_size // num_kv_heads`` ranks (one head per rank)."""
    if num_kv_heads >= tp_size:
        return split_size(num_kv_heads, tp_size, "the number of KV heads"), tp_size
    if tp_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size={tp_size} is larger than the number of KV heads ({num_kv_heads}) "
                         f"and not a multiple of it, so the KV heads cannot be replicated evenly")
    return 1, num_kv_heads


def check_tensor_parallel(model_config, tp_size: int) -> None:
    """Refuse a tensor-parallel size the model's shapes cannot be split by (before any process starts)."""
    if tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp_size}")
    if tp_size == 1:
        return
    c = model_config
    split_size(c.num_heads, tp_size, "the number of attention heads")
    kv_head_split(c.num_kv_heads, tp_size)
    split_size(c.intermediate_size, tp_size, "the MLP intermediate size")
    split_size(c.vocab_size, tp_size, "the vocabulary size")
