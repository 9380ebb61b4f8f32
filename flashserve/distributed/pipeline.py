"""Pipeline micro-batches: the last stage samples, the earlier stages receive its token ids.

With ``pipeline_parallel_size`` > 1 (and neither speculative decoding nor early exit, which keep
every rank sampling the broadcast logits, one micro-batch at a time) the stages of a step do not
wait for each other inside ``Worker.execute``:

* a stage before the last runs its layers, hands hidden states and residual on with sends it
  does not wait for (``ParallelContext.send_next_stage``), posts the receive of the step's result
  packet (``expect``) and returns;
* the last stage receives them, runs its layers, computes the logits of the sampling rows (only
  there) and samples; its tensor rank 0 then sends the step's packet to every rank of the earlier
  stages (``publish``);
* ``StepHandle.result()`` on an earlier stage waits for the packet and reads the tokens from it
  (``collect``), so stage 0 is free to run micro-batch N+1 while the next stage runs N. The
  engine keeps those plans on disjoint requests (a request's next step needs its token).

The packet of a step with S sampling rows: ``[S]`` int64 ids or, when a row asked for logprobs
(k = the largest number asked, at least 1), ``[S, 2 + 2k]`` float64: the id, its logprob, k top
ids, k top logprobs (ids below 2**53 are exact in float64). Both sides derive its shape from the
plan, so nothing else travels.

Order: every rank applies the driver's plans in one order; activations go on the world group
(point-to-point, matched in order per pair of ranks), packets on ``ParallelContext.result_group``,
one send per step per receiving rank, in step order. The two directions use two groups so that a
stage's activations of micro-batch N+1 never wait behind the packet of N (an NCCL communicator
runs its operations in the order they were issued).
"""

from __future__ import annotations

from typing import Any

import torch

from flashserve.distributed.parallel_state import ParallelContext
from flashserve.layers.sampler import SamplerOutput, logprobs_width


def pack(out: SamplerOutput) -> torch.Tensor:
    """One step's sampled tokens (and logprobs) as one tensor (see the module docstring)."""
    if out.logprobs is None:
        return out.token_ids.to(torch.int64).contiguous()
    return torch.cat([out.token_ids[:, None].double(), out.logprobs[:, None].double(), out.top_ids.double(),
                      out.top_logprobs.double()], dim=1)


def unpack(packet: torch.Tensor, k: int | None) -> dict[str, torch.Tensor]:
    """The host tensors ``Worker._finish`` reads, from a packet on the host."""
    if k is None:
        return {"token_ids": packet}
    return {"token_ids": packet[:, 0].long(), "logprobs": packet[:, 1].float(),
            "top_ids": packet[:, 2 : 2 + k].long(), "top_logprobs": packet[:, 2 + k :].float()}


class StageResults:
    """One rank's part in returning a micro-batch's tokens from the last stage."""

    def __init__(self, ctx: ParallelContext, device: torch.device) -> None:
        self.ctx = ctx
        self.device = device
        self.samples = ctx.is_last_stage  # this rank computes logits and samples
        self.root = (ctx.pp_size - 1) * ctx.tp_size  # tensor rank 0 of the last stage sends
        self.wire = ctx.wire_device(device)  # where packets travel from
        self._copy_stream = torch.cuda.Stream(device) if self.wire.type == "cuda" else None

    def publish(self, out: SamplerOutput) -> list[Any]:
        """Last stage: send the step's packet to every earlier rank (not waited for; the returned
        works keep it alive until the step's result is read)."""
        if self.ctx.rank != self.root:
            return []
        packet = self.ctx.to_wire(pack(out))
        return [self.ctx.result_group.send([packet], dst, 0) for dst in range(self.root)]

    def expect(self, states: list) -> tuple[torch.Tensor, Any, int | None]:
        """Earlier stage: post the receive of a step's packet (its rows: ``states``)."""
        k = logprobs_width(states)  # the sampler's top-k: the packet's shape
        shape, dtype = ((len(states),), torch.int64) if k is None else ((len(states), 2 + 2 * k), torch.float64)
        buf = torch.empty(shape, dtype=dtype, device=self.wire)
        return buf, self.ctx.result_group.recv([buf], self.root, 0), k

    def collect(self, pending: tuple[torch.Tensor, Any, int | None]) -> dict[str, torch.Tensor]:
        """Earlier stage: wait for a posted packet and return its host tensors. On CUDA only the
        receive and its copy are waited for (on a side stream), not this stage's later work."""
        buf, work, k = pending
        if self._copy_stream is None:
            work.wait()
            return unpack(buf, k)
        with torch.cuda.stream(self._copy_stream):
            work.wait()  # this stream waits for the receive
            host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
            host.copy_(buf, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        done.synchronize()
        return unpack(host, k)
