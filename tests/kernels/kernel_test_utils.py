"""Helpers for the kernel tests (thin re-exports of ``flashserve.kernels.testing``)."""

from __future__ import annotations

import torch

from flashserve.kernels.testing import RandomPagedBatch as PagedBatch  # noqa: F401
from flashserve.kernels.testing import tolerance as tol  # noqa: F401

ON_GPU = torch.cuda.is_available()
