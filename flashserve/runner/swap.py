"""Host swap space for swap preemption, and the block moves a plan asks for.

``HostSwapSpace`` owns one host tensor shaped like the device pool,
``[num_layers, 2, num_host_blocks, block_size, kv_heads, head_dim]`` (pinned when the pool is
on CUDA, so copies are real DMA and can be asynchronous). Blocks move with ``index_select`` on
the source and ``index_copy_`` into the destination along the block dimension: one gather and
one scatter per direction per step, whatever the number of blocks.

``apply_block_copies`` executes a plan's ``BlockCopy`` before the forward pass, in the order
that makes one step's moves safe: swap-outs (device -> host) first, so a device block freed by
a swap-out and reused by a swap-in of the same step is read before it is overwritten; then
swap-ins (host -> device); then device-to-device copies (copy-on-write; the scheduler never
emits them today, see ``flashserve.cache.block_manager``). The scheduler defers host-block
frees by a step, so a host block read by a swap-in is never written by a swap-out of the same
step. Copies are issued on the current stream, so the forward that follows sees them.
"""

from __future__ import annotations

import torch

from flashserve.sched.plan import BlockCopy


class HostSwapSpace:
    """The host-side KV blocks."""

    def __init__(self, device_pool: torch.Tensor, num_host_blocks: int) -> None:
        shape = list(device_pool.shape)
        shape[2] = num_host_blocks
        pin = device_pool.is_cuda and torch.cuda.is_available()
        self.blocks = torch.empty(shape, dtype=device_pool.dtype, device="cpu", pin_memory=pin)
        self.num_blocks = num_host_blocks

    @staticmethod
    def bytes_per_block(device_pool: torch.Tensor) -> int:
        per = device_pool[:, :, 0].numel() * device_pool.element_size()
        return int(per)

    def swap_out(self, device_pool: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Copy device blocks to host blocks: ``pairs`` of (device block, host block)."""
        if not pairs:
            return
        src = torch.tensor([d for d, _ in pairs], dtype=torch.int64, device=device_pool.device)
        dst = torch.tensor([h for _, h in pairs], dtype=torch.int64)
        # A blocking device-to-host copy: the host data must be complete before the scatter.
        self.blocks.index_copy_(2, dst, device_pool.index_select(2, src).cpu())

    def swap_in(self, device_pool: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Copy host blocks back to device blocks: ``pairs`` of (host block, device block)."""
        if not pairs:
            return
        src = torch.tensor([h for h, _ in pairs], dtype=torch.int64)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.int64, device=device_pool.device)
        data = self.blocks.index_select(2, src)
        if device_pool.device.type != "cpu":
            data = data.pin_memory().to(device_pool.device, non_blocking=True)
        device_pool.index_copy_(2, dst, data)


def copy_blocks(device_pool: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """Device-to-device block copies: ``pairs`` of (source block, destination block)."""
    if not pairs:
        return
    src = torch.tensor([s for s, _ in pairs], dtype=torch.int64, device=device_pool.device)
    dst = torch.tensor([d for _, d in pairs], dtype=torch.int64, device=device_pool.device)
    device_pool.index_copy_(2, dst, device_pool.index_select(2, src))


def apply_block_copies(device_pool: torch.Tensor, swap: HostSwapSpace | None, copies: BlockCopy) -> None:
    """Execute a plan's block moves: swap-outs, then swap-ins, then device copies."""
    if copies.swap_out or copies.swap_in:
        if swap is None:
            raise RuntimeError("the plan swaps blocks but the engine has no host swap space")
        swap.swap_out(device_pool, copies.swap_out)
        swap.swap_in(device_pool, copies.swap_in)
    copy_blocks(device_pool, copies.copy)
