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
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place: ``tp_rank`` of ``tp_size`` within its tensor-parallel group (the ranks
    of one pipeline stage), stage ``pp_rank`` of ``pp_size``. Global rank
    ``pp_rank * tp_size + tp_rank`` in ``world_group`` (all ranks)."""

    tp_rank: int = 0
    tp_size: int = 1
    tp_group: dist.ProcessGroup | None = None
    pp_rank: int = 0
    pp_size: int = 1
    world_group: dist.ProcessGroup | None = None
    # Pipeline micro-batches: the last stage's sampled ids go to the earlier stages' ranks on a
    # group of their own, so they never queue behind activations of later micro-batches (NCCL
    # runs one communicator's operations in issue order).
    result_group: dist.ProcessGroup | None = None
    # Every rank on one GPU (gloo groups, NCCL refuses that): point-to-point tensors go through host memory.
    p2p_through_host: bool = False
    # Activation sends not waited for yet (``send_next_stage``; ``take_sends`` hands them over).
    _sends: list = field(default_factory=list, compare=False, repr=False)

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.pp_size * self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """This stage's decoder layers ``[start, end)``: contiguous, the first stages taking one
        more when ``pp_size`` does not divide ``num_layers``."""
        base, extra = divmod(num_layers, self.pp_size)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return start, start + base + (self.pp_rank < extra)

    def send_next_stage(self, tensors: list[torch.Tensor]) -> None:
        """Hand activations to the same tensor-parallel rank of the next stage without waiting
        for the transfer: the stage goes on with its next micro-batch while the next stage
        receives. The pending sends (which keep their tensors alive) are collected with
        ``take_sends`` and waited for once the step's result is read."""
        dst = self.rank + self.tp_size
        for i, t in enumerate(tensors):
            self._sends.append(self.world_group.send([self.to_wire(t)], dst, i))

    def take_sends(self) -> list:
        """The activation sends issued since the last call (their ``Work`` objects)."""
        sends, self._sends[:] = list(self._sends), []
        return sends

    def recv_prev_stage(self, like: list[torch.Tensor]) -> list[torch.Tensor]:
        src = self.rank - self.tp_size
        out = [torch.empty_like(t, device=self.wire_device(t.device)) for t in like]
        for i, t in enumerate(out):
            self.world_group.recv([t], src, i).wait()
        return [o.to(t.device) for o, t in zip(out, like)]

    def wire_device(self, device: torch.device) -> torch.device:
        """Where point-to-point tensors of ``device`` travel from (host memory when staged)."""
        return torch.device("cpu") if self.p2p_through_host else device

    def to_wire(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` ready to send: contiguous, on the host when staged."""
        return t.contiguous().to(self.wire_device(t.device))

    def broadcast_from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank gets the last stage's (tensor rank 0's) ``t`` (logits: all ranks sample)."""
        if self.pp_size == 1:
            return t
        opts = dist.BroadcastOptions()
        opts.rootRank = (self.pp_size - 1) * self.tp_size
        self.world_group.broadcast([t], opts).wait()
        return t

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
        """The smallest ``value`` over all ranks (they agree on a KV pool size)."""
        group = self.world_group if self.world_group is not None else self.tp_group
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        if group.name() == "nccl":  # NCCL reduces device tensors only
            t = t.cuda()
        group.allreduce([t], opts).wait()
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


def check_tensor_parallel(model_config, tp_size: int, pp_size: int = 1) -> None:
    """Refuse sizes the model's shapes cannot be split by (before any process starts)."""
    if pp_size > model_config.num_layers:
        raise ValueError(f"pipeline_parallel_size={pp_size} is larger than the number of layers "
                         f"({model_config.num_layers}); each stage needs at least one")
    if tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp_size}")
    if tp_size == 1:
        return
    c = model_config
    kinds = sorted({c.layer_spec(i).mlp for i in range(c.num_layers)} - {"gated_silu", "moe"})
    if c.num_experts:  # MoE layers split by expert (flashserve.distributed.expert_parallel)
        from flashserve.distributed.expert_parallel import check_expert_parallel

        check_expert_parallel(c, tp_size)
    if kinds:
        raise ValueError(f"tensor parallelism of {', '.join(kinds)} MLP layers is not implemented; "
                         f"use pipeline_parallel_size to split this model")
    split_size(c.num_heads, tp_size, "the number of attention heads")
    kv_head_split(c.num_kv_heads, tp_size)
    split_size(c.intermediate_size, tp_size, "the MLP intermediate size")
    split_size(c.vocab_size, tp_size, "the vocabulary size")
