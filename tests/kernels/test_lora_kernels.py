"""The few-row LoRA kernels (flashserve.kernels.lora) against the masked products over every slot
that flashserve.lora.layers uses for larger steps, on random inputs: rows of several adapters and
of none, widths and sizes that are not multiples of the blocks."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import ON_GPU, tol

from flashserve.kernels.lora import MAX_ROWS, add_lora


def _reference(y, x, a, b_t, ids, width):
    col_slot = torch.arange(a.shape[0], device=a.device) // width
    t = (x.float() @ a.float().t()) * (ids[: x.shape[0], None] == col_slot)
    return (y.float() + t @ b_t.float()).to(y.dtype)


@pytest.mark.parametrize("rows", [1, 5, MAX_ROWS])
@pytest.mark.parametrize("width", [8, 48])
def test_add_lora_matches_masked_products(device, dtype, rows, width):
    k, n, slots = (4096, 6144, 4) if ON_GPU else (200, 300, 3)
    g = torch.Generator().manual_seed(rows * 100 + width)
    x = torch.randn(rows, k, generator=g).to(dtype).to(device)
    y = torch.randn(rows, n, generator=g).to(dtype).to(device)
    a = (torch.randn(slots * width, k, generator=g) / k**0.5).to(dtype).to(device)
    b_t = torch.randn(slots * width, n, generator=g).to(dtype).to(device)
    ids = torch.randint(-1, slots, (rows + 3,), generator=g)
    ids[0], ids[rows - 1] = slots - 1, -1 if rows > 1 else slots - 1  # the last slot, and a row without one
    ids = ids.to(device)
    want = _reference(y, x, a, b_t, ids, width)
    before = y.clone()
    got = add_lora(y, x, a, b_t, ids, width)
    assert got.data_ptr() == y.data_ptr()  # in place
    torch.testing.assert_close(got.float(), want.float(), **tol(dtype))
    plain = (ids[:rows] < 0).cpu()
    assert torch.equal(got[plain.to(device)], before[plain.to(device)])  # rows without an adapter keep their bits


def test_add_lora_reads_strided_rows(device):
    """x and y as views with row strides wider than their rows (a fused layer's slice)."""
    g = torch.Generator().manual_seed(3)
    wide_x = torch.randn(4, 96, generator=g).to(device)
    wide_y = torch.randn(4, 80, generator=g).to(device)
    x, y = wide_x[:, :64], wide_y[:, 16:64]
    a = torch.randn(2 * 8, 64, generator=g).to(device)
    b_t = torch.randn(2 * 8, 48, generator=g).to(device)
    ids = torch.tensor([1, -1, 0, 1], device=device)
    want = _reference(y.clone(), x, a, b_t, ids, 8)
    add_lora(y, x, a, b_t, ids, 8)
    torch.testing.assert_close(wide_y[:, 16:64], want, rtol=1e-5, atol=1e-5)
