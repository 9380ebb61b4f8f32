"""Host swap space for swap preemption, and the block moves a plan asks for.

``HostSwapSpace`` owns one host tensor of ``num_host_blocks`` blocks, block-major:
``[num_host_blocks, num_layers, 2, block_size, kv_heads, head_dim]`` (an 8-bit pool:
``[num_host_blocks, num_layers, 2, block_bytes]`` uint8, values and scales together, see
``flashserve.kernels.kv_quant.whole_blocks``), pinned when the pool is on CUDA. A host block is
one contiguous region, so every move is an asynchronous DMA copy that the
host never waits for: a swap-out gathers the device blocks into one device buffer (one
``index_select``) and copies each run of consecutive host blocks out of it; a swap-in copies the
host runs into a device buffer and scatters it into the pool (one ``index_copy_``). All on the
current stream, so the forward that follows, and any later swap-in, sees the data in order.

``apply_block_copies`` executes a plan's ``BlockCopy`` before the forward pass, in the order
that makes one step's moves safe: swap-outs (device -> host) first, so a device block freed by
a swap-out and reused by a swap-in of the same step is read before it is overwritten; then
swap-ins (host -> device). The scheduler defers host-block frees by a step, so a host block
read by a swap-in is never written by a swap-out of the same step.
"""

from __future__ import annotations

import torch

from flashserve.kernels.kv_quant import whole_blocks
from flashserve.sched.plan import BlockCopy


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(start index in ``ids``, first id, length) of each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(ids):
        if runs and b == runs[-1][1] + runs[-1][2]:
            start, first, n = runs[-1]
            runs[-1] = (start, first, n + 1)
        else:
            runs.append((i, b, 1))
    return runs


class HostSwapSpace:
    """The host-side KV blocks."""

    def __init__(self, device_pool: torch.Tensor, num_host_blocks: int) -> None:
        # device pool [L, 2, N, bs, H, D] -> host [N_host, L, 2, bs, H, D] (8-bit: [N_host, L, 2, block_bytes])
        blocks = whole_blocks(device_pool)
        shape = (num_host_blocks, *blocks.shape[:2], *blocks.shape[3:])
        self.pinned = device_pool.is_cuda and torch.cuda.is_available()
        self.blocks = torch.empty(shape, dtype=blocks.dtype, device="cpu", pin_memory=self.pinned)
        self.num_blocks = num_host_blocks

    def _index(self, ids: list[int], device: torch.device) -> torch.Tensor:
        t = torch.tensor(ids, dtype=torch.int64)
        return t.pin_memory().to(device, non_blocking=True) if self.pinned else t.to(device)

    @staticmethod
    def bytes_per_block(device_pool: torch.Tensor) -> int:
        blocks = whole_blocks(device_pool)
        return int(blocks[:, :, 0].numel() * blocks.element_size())

    def swap_out(self, device_pool: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Copy device blocks to host blocks: ``pairs`` of (device block, host block)."""
        if not pairs:
            return
        src = self._index([d for d, _ in pairs], device_pool.device)
        gathered = whole_blocks(device_pool).index_select(2, src).movedim(2, 0).contiguous()  # [n, L, 2, bs, H, D]
        for i, first, n in _runs([h for _, h in pairs]):
            self.blocks[first : first + n].copy_(gathered[i : i + n], non_blocking=self.pinned)

    def swap_in(self, device_pool: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        """Copy host blocks back to device blocks: ``pairs`` of (host block, device block)."""
        if not pairs:
            return
        staged = torch.empty((len(pairs), *self.blocks.shape[1:]), dtype=self.blocks.dtype, device=device_pool.device)
        for i, first, n in _runs([h for h, _ in pairs]):
            staged[i : i + n].copy_(self.blocks[first : first + n], non_blocking=self.pinned)
        dst = self._index([d for _, d in pairs], device_pool.device)
        whole_blocks(device_pool).index_copy_(2, dst, staged.movedim(0, 2))


def apply_block_copies(device_pool: torch.Tensor, swap: HostSwapSpace | None, copies: BlockCopy) -> None:
    """Execute a plan's block moves: host-tier saves of evicted blocks (read before anything
    writes them), device copies (forked beams), swap-outs, then swap-ins (and host-tier loads)."""
    if copies.host_save:
        if swap is None:
            raise RuntimeError("the plan saves blocks to the host KV tier but the engine has no host space")
        swap.swap_out(device_pool, list(copies.host_save))
    if copies.copy:
        blocks = whole_blocks(device_pool)  # [L, 2, N, ...]: values and (8-bit) scales together
        src = torch.tensor([s for s, _ in copies.copy], device=device_pool.device)
        dst = torch.tensor([d for _, d in copies.copy], device=device_pool.device)
        blocks.index_copy_(2, dst, blocks.index_select(2, src))
    if not (copies.swap_out or copies.swap_in):
        return
    if swap is None:
        raise RuntimeError("the plan swaps blocks but the engine has no host swap space")
    swap.swap_out(device_pool, list(copies.swap_out))
    swap.swap_in(device_pool, list(copies.swap_in))
