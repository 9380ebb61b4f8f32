"""Greedy acceptance of draft token trees (chains included) in one launch.

A verification step of greedy rows walks each row's tree from the root: emit the target's argmax
at the current node, move into the child that carries it, stop when no child does. Written as
tensor operations that is a dozen small launches per tree level (gather, compare, where ...), and
nothing overlaps a verification step, so the step waits for the host to issue each of them.
Here one program per row walks its tree.

Inputs: ``argmax`` [N] int64, the target's greedy token at every node of every row; ``trees``
[R, 2 + 2M] int64, per row the index in ``argmax`` of its first node (the root; its n nodes are
consecutive there, in node order), n, then the parents of its M node slots (the root's -1) and
their tokens (slots past n are padding). ``width``: levels of the deepest path + 1. Outputs,
views of one allocation: the emitted tokens [R, width] (0 past them), the node each came from
[R, width] (the accepted path; 0 past it), the count [R] and the last emitted token [R]. Among
children that carry the same token the first in node order wins (``TokenTree.children``'
priority order). The reference is ``greedy_accept_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashserve.kernels.utils import next_power_of_2

Accepted = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # tokens, path, count, last


@triton.jit(do_not_specialize=["stride_t", "M", "R", "W"])  # one compile for every batch and tree size
def _greedy_accept_kernel(argmax_ptr, trees_ptr, out_ptr, stride_t, M, R, W, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = trees_ptr + r * stride_t
    first = tl.load(row)
    n = tl.load(row + 1)
    i = tl.arange(0, BLOCK)
    parent = tl.load(row + 2 + i, mask=i < n, other=-2)
    token = tl.load(row + 2 + M + i, mask=i < n, other=-1)
    cur = n * 0
    count = n * 0
    last = n * 0
    alive = n > 0
    for level in range(W):
        t = tl.load(argmax_ptr + first + cur)
        tl.store(out_ptr + r * W + level, tl.where(alive, t, 0))
        tl.store(out_ptr + R * W + r * W + level, tl.where(alive, cur, 0))
        count += alive.to(tl.int64)
        last = tl.where(alive, t, last)
        nxt = tl.min(tl.where((parent == cur) & (token == t), i, BLOCK), axis=0)
        alive = alive & (nxt < BLOCK)
        cur = tl.where(alive, nxt, cur)
    tl.store(out_ptr + 2 * R * W + r, count)
    tl.store(out_ptr + 2 * R * W + R + r, last)


def _views(out: torch.Tensor, R: int, W: int) -> Accepted:
    return out[: R * W].view(R, W), out[R * W : 2 * R * W].view(R, W), out[2 * R * W : 2 * R * W + R], \
        out[2 * R * W + R :]


def greedy_accept(argmax: torch.Tensor, trees: torch.Tensor, width: int) -> Accepted:
    """See the module docstring: the Triton kernel for CUDA tensors, the reference for CPU ones
    (the kernel's tests run it on the CPU in Triton's interpreter)."""
    if not argmax.is_cuda:
        return greedy_accept_ref(argmax, trees, width)
    return greedy_accept_triton(argmax, trees, width)


def greedy_accept_triton(argmax: torch.Tensor, trees: torch.Tensor, width: int) -> Accepted:
    R, M = trees.shape[0], (trees.shape[1] - 2) // 2
    out = torch.empty(2 * R * width + 2 * R, dtype=torch.int64, device=argmax.device)
    if R:
        _greedy_accept_kernel[(R,)](argmax, trees, out, trees.stride(0), M, R, width, BLOCK=next_power_of_2(M))
    return _views(out, R, width)


def greedy_accept_ref(argmax: torch.Tensor, trees: torch.Tensor, width: int) -> Accepted:
    """``greedy_accept`` as a walk in Python."""
    R, M = trees.shape[0], (trees.shape[1] - 2) // 2
    best = argmax.tolist()
    tokens, path = [[0] * width for _ in range(R)], [[0] * width for _ in range(R)]
    count, last = [0] * R, [0] * R
    for r, (first, n, *slots) in enumerate(trees.tolist()):
        parents, toks = slots[:M], slots[M:]
        cur = 0
        for level in range(width):
            t = best[first + cur]
            tokens[r][level], path[r][level] = t, cur
            count[r], last[r] = level + 1, t
            cur = next((i for i in range(1, n) if parents[i] == cur and toks[i] == t), -1)
            if cur < 0:
                break
    flat = [x for rows in (tokens, path) for row in rows for x in row] + count + last
    return _views(torch.tensor(flat, dtype=torch.int64, device=argmax.device), R, width)
